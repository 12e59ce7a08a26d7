"""An append-only log of segment files, framed so that client bytes cannot pass for records.

Segments are ``seg-%08d.log`` and rotate when they pass ``segment_bytes``. A segment begins
with a 32-byte header: ``FRLSEG2\n``, a random 16-byte key and a random 8-byte marker,
never sent anywhere. Each record frame is ``<marker><u32 length><u64 seq><mac><payload>``
(little endian; ``seq`` rises by one a record across segments and restarts; ``mac`` the
CRC32 of the key, length, seq and payload). A group's token bytes can hold anything, but
not a frame that recovery takes: that needs the segment's secret marker and key. Segments written before this
format (no header: ``<u32 length><u32 crc32(payload)><payload>`` frames) are still read.

Invariants:
- ``append`` returns only after the record is written to the OS (unbuffered: no byte of a
  failed append lingers in a user-space buffer to reach the file with a later one); it is
  fsynced before return with ``fsync="always"``, at most ``fsync_interval_ms`` later with
  ``fsync="interval"`` (by a background thread, so appends never wait for the disk), and
  left to the OS with ``fsync="never"``. ``append_many`` does the same for several records
  with one write and fsync (the same bytes on disk);
- an append that raises left nothing in the log: a failed write or fsync (ENOSPC, EIO) is
  undone by truncating every segment it touched back to where it started, and that
  truncation is fsynced. When the undo fails, or a background or checkpoint fsync fails
  (acknowledged records may then be gone from the page cache: Linux drops dirty pages on a
  failed fsync), the log is ``failed``: every later append raises ``LogFailed``, so nothing
  more is acknowledged, and the owner must restart and recover from the disk;
- a new segment file is fsynced in its directory before its first record is acknowledged,
  so with ``fsync="always"`` an acknowledged record survives power loss;
- ``read_all`` yields every intact record in order (from a ``position()``, for recovery
  after a checkpoint); a torn tail (a partial last frame) is truncated away, and a damaged
  record is skipped; both are counted. After damage reading resumes at the next marker that
  starts a frame whose MAC verifies and whose seq is above the last one read (found with
  one ``bytes.find`` per candidate: linear, C speed), so one bad byte loses one record; the
  skipped stretch counts once in ``corrupt_skipped``, and records missing by seq are
  counted in ``lost_records``. Damage with no intact frame after it is a torn tail: its
  bytes are counted and, in the last segment, truncated (where Kafka truncates: nothing
  after the last good record of the active segment is kept).
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

FRAME = struct.Struct("<II")  # the legacy frame (and the checkpoint files' framing)
MAGIC = b"FRLSEG2\n"
_COPY = struct.Struct("<8s16s8sI4x")  # magic, key, marker, CRC32 of the three: 40 bytes
HEADER = 2 * _COPY.size  # the header twice: one damaged copy loses nothing
FORMAT_FILE = "FORMAT"  # the index of the first segment of this format, durable first
HEAD = struct.Struct("<8sIQ8s")  # marker, length, seq, mac
_LENSEQ = struct.Struct("<IQ")
_CRC = struct.Struct("<Q")


def _mac(key: bytes, length: int, seq: int, parts) -> bytes:
    """The frame's check: CRC32 of the segment's key, length, seq and payload. Forgery is
    kept out by the marker (64 secret bits a frame must start with) and the key; the CRC
    catches damage at CRC speed (a keyed BLAKE2b took visibly more of an insert)."""
    crc = zlib.crc32(_LENSEQ.pack(length, seq), zlib.crc32(key))
    for part in parts:
        crc = zlib.crc32(part, crc)
    return _CRC.pack(crc)


def _header(key: bytes, marker: bytes) -> bytes:
    copy = _COPY.pack(MAGIC, key, marker, zlib.crc32(MAGIC + key + marker))
    return copy + copy


def _segment_meta(head: bytes) -> tuple[bytes, bytes] | None:
    """(key, marker) from the first intact copy of a segment header; None if neither is."""
    for at in (0, _COPY.size):
        if len(head) >= at + _COPY.size:
            magic, key, marker, crc = _COPY.unpack_from(head, at)
            if magic == MAGIC and zlib.crc32(MAGIC + key + marker) == crc:
                return key, marker
    return None


def _frame2_at(data, pos: int, key: bytes, marker: bytes):
    """(seq, payload) of an intact frame at ``pos``, else None."""
    if pos + HEAD.size > len(data):
        return None
    mark, length, seq, mac = HEAD.unpack_from(data, pos)
    end = pos + HEAD.size + length
    if mark != marker or length == 0 or length > MAX_RECORD or end > len(data):
        return None
    payload = bytes(data[pos + HEAD.size : end])
    return (seq, payload) if _mac(key, length, seq, (payload,)) == mac else None


class LogFailed(OSError):
    """The log can no longer promise durability; restart and recover from the disk."""


# the log's file I/O, one seam (fault-injection tests replace these)
def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync(fd: int) -> None:
    os.fsync(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a new file's name) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """mkdir -p whose every new directory's name is durable (its parent fsynced)."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        fsync_dir(directory.parent)


FSYNC_POLICIES = ("always", "interval", "never")
MAX_RECORD = 1 << 30


@dataclass
class RecoveryReport:
    """What reading the log found: records, torn bytes, corrupt frames."""

    records: int = 0
    corrupt_skipped: int = 0
    torn_bytes_truncated: int = 0
    lost_records: int = 0  # records missing between intact ones (by their seq)
    damaged_segments: int = 0  # segments of this format with no intact header (skipped)


def _frame_at(data: bytes, pos: int) -> bytes | None:
    """The payload of an intact frame starting at ``pos``, else None. Empty frames do not
    exist (eight zero bytes would pass the CRC), so a zero-filled tail reads as torn."""
    if pos + FRAME.size > len(data):
        return None
    length, crc = FRAME.unpack_from(data, pos)
    end = pos + FRAME.size + length
    if length == 0 or length > MAX_RECORD or end > len(data):
        return None
    payload = data[pos + FRAME.size : end]
    return payload if zlib.crc32(payload) == crc else None


class SegmentLog:
    """The append-only, CRC-framed segment log every state change goes to."""

    def __init__(
        self,
        directory: str | Path,
        segment_bytes: int = 64 * 1024 * 1024,
        fsync: str = "interval",
        fsync_interval_ms: float = 10.0,
    ):
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"unknown fsync policy {fsync!r}; expected one of {FSYNC_POLICIES}")
        self.dir = Path(directory)
        make_dirs(self.dir)
        self.segment_bytes, self.fsync = segment_bytes, fsync
        self.fsync_interval = fsync_interval_ms / 1000.0
        self._file = None
        self._last_sync = time.monotonic()
        self._written = 0  # appends flushed to the OS so far
        self._synced = 0  # ... of which the last finished fsync covers this many
        # the file is swapped (rotation, close) and fsynced only under this lock: with
        # fsync="interval" a background thread does the fsyncs, so that appending (and the
        # server's acks) never waits for the disk
        self._lock = threading.Lock()
        self._syncer: threading.Thread | None = None
        self._wake = threading.Event()
        self._closing = False
        self.sync_errors = 0  # failed fsyncs (each fails the log but an append's own)
        self.write_errors = 0  # appends undone after a failed write or fsync
        self.appended_bytes = 0  # bytes appended since this log was opened
        self.failed: BaseException | None = None  # set: no append is acknowledged again
        self._lock_file = None  # the writer's lock on the directory (``lock``)
        self._seq: int | None = None  # the last record's seq (found when first needed)
        self._meta: tuple[bytes, bytes] | None = None  # the open segment's key and marker

    def segments(self) -> list[Path]:
        return sorted(self.dir.glob("seg-*.log"))

    def first_new_format(self) -> int | None:
        """The index of the first segment of this format: below it segments are legacy and
        read as such; from it on, one without an intact header is damaged, never read as
        legacy (that framing would take client bytes for records)."""
        path = self.dir / FORMAT_FILE
        if path.exists():
            try:
                return int(path.read_text().strip())
            except ValueError:
                return 1  # unreadable: trust no segment as legacy
        for seg in self.segments():  # written before the file existed: the first intact one
            with open(seg, "rb") as f:
                if _segment_meta(f.read(HEADER)) is not None:
                    return self.index(seg)
        return None

    def _mark_new_format(self, index: int) -> None:
        """Record, durably, that segments from ``index`` on are of this format."""
        if self.first_new_format() is not None:
            return
        tmp = self.dir / f".{FORMAT_FILE}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{index}\n")
            f.flush()
            fsync(f.fileno())
        os.replace(tmp, self.dir / FORMAT_FILE)
        fsync_dir(self.dir)

    @staticmethod
    def index(path: Path) -> int:
        return int(path.stem.split("-")[1])

    def position(self) -> tuple[int, int]:
        """(segment index, byte offset) just past the last record written: what a checkpoint
        covers. Records appended later sort after it; (0, 0) before the first record."""
        if self._file is not None:
            return self.index(Path(self._file.name)), self._size
        segs = self.segments()
        return (self.index(segs[-1]), segs[-1].stat().st_size) if segs else (0, 0)

    def read_all(
        self,
        report: RecoveryReport | None = None,
        start: tuple[int, int] = (0, 0),
        truncate: bool = True,
    ) -> Iterator[bytes]:
        """Every intact record at or after ``start``, oldest first. Truncates a torn tail of
        the last segment unless ``truncate`` is False (read-only readers of a stored run)."""
        for _, payload in self.read_from(report, start, truncate):
            yield payload

    def read_from(
        self,
        report: RecoveryReport | None = None,
        start: tuple[int, int] = (0, 0),
        truncate: bool = True,
        end: tuple[int, int] | None = None,
    ) -> Iterator[tuple[tuple[int, int], bytes]]:
        """``read_all`` with each record's position (segment index, offset of its frame),
        stopping before the first record at or after ``end`` (nothing is truncated then)."""
        report = report if report is not None else RecoveryReport()
        segs = [p for p in self.segments() if self.index(p) >= start[0]]
        boundary = self.first_new_format()
        previous = None  # the last seq read, for counting records missing between
        for i, path in enumerate(segs):
            index = self.index(path)
            if end is not None and (index, 0) >= end:
                return
            data = path.read_bytes()
            meta = _segment_meta(data)
            new_format = meta is not None or (boundary is not None and index >= boundary)
            if new_format and meta is None:  # both header copies damaged: not legacy
                report.damaged_segments += 1
                print(f"replay log: {path.name} has no intact header: skipped, kept",
                      file=sys.stderr)  # fmt: skip
                continue
            first = HEADER if meta is not None else 0
            pos = max(start[1], first) if index == start[0] else first
            last_seq = None  # seqs rise within a segment; each segment has its own key
            while pos < len(data):
                if end is not None and (index, pos) >= end:
                    return
                if meta is not None:
                    found = _frame2_at(data, pos, *meta)
                    if found is not None and (last_seq is None or found[0] > last_seq):
                        seq, payload = found
                        if previous is not None and seq > previous + 1:
                            report.lost_records += seq - previous - 1
                        last_seq = previous = seq
                        report.records += 1
                        yield (index, pos), payload
                        pos += HEAD.size + len(payload)
                        continue
                    nxt = self._resync(data, pos, meta, last_seq)
                else:
                    payload = _frame_at(data, pos)
                    if payload is not None:
                        report.records += 1
                        yield (index, pos), payload
                        pos += FRAME.size + len(payload)
                        continue
                    # legacy damage: resume at the next offset where an intact frame starts
                    nxt = next((q for q in range(pos + 1, len(data)) if _frame_at(data, q)),
                               None)  # fmt: skip
                if nxt is None:
                    break
                report.corrupt_skipped += 1
                pos = nxt
            if pos < len(data):
                report.torn_bytes_truncated += len(data) - pos
                if truncate and i == len(segs) - 1:
                    with open(path, "r+b") as f:
                        f.truncate(pos)
                        os.fsync(f.fileno())

    def _last_seq(self) -> int:
        """The seq of the newest record of this format (0 if none): new records go on
        from it."""
        boundary = self.first_new_format()
        for path in reversed(self.segments()):
            if boundary is None or self.index(path) < boundary:
                break  # legacy segments are older than every new one: no seq in them
            with open(path, "rb") as f:
                if _segment_meta(f.read(HEADER)) is None:
                    continue  # a damaged one
            data = path.read_bytes()
            meta = _segment_meta(data)
            pos, last = HEADER, None
            while pos is not None and pos < len(data):
                found = _frame2_at(data, pos, *meta)
                if found is not None and (last is None or found[0] > last):
                    last = found[0]
                    pos += HEAD.size + len(found[1])
                else:
                    pos = self._resync(data, pos, meta, last)
            if last is not None:
                return last
        return 0

    @staticmethod
    def _resync(data, pos: int, meta, last_seq) -> int | None:
        """The next offset after ``pos`` where a frame of this segment verifies and follows
        ``last_seq``; None if there is none."""
        key, marker = meta
        q = data.find(marker, pos + 1)
        while q != -1:
            found = _frame2_at(data, q, key, marker)
            if found is not None and (last_seq is None or found[0] > last_seq):
                return q
            q = data.find(marker, q + 1)
        return None

    def lock(self) -> None:
        """Take the directory for this log's writer alone (an exclusive lock on its ``LOCK``
        file, held until ``close``): two servers on one log (a restart during a partition)
        would interleave records. Read-only readers do not lock."""
        import fcntl

        handle = open(self.dir / "LOCK", "a+")  # noqa: SIM115 - held until close
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RuntimeError(f"the replay log {self.dir} is in use by {holder}: one server "
                               "per directory") from None  # fmt: skip
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._lock_file = handle

    def roll(self, past: int = 0) -> None:
        """Write the next record to a new segment, numbered above the last one and above
        ``past``."""
        self._close_file()
        with self._lock:
            self._open_segment(new=True, past=past)

    def _open_segment(self, new: bool = False, past: int = 0) -> None:
        segs = self.segments()
        meta = None
        if segs and not new and segs[-1].stat().st_size < self.segment_bytes:
            with open(segs[-1], "rb") as f:
                meta = _segment_meta(f.read(HEADER))
        if meta is not None:  # a segment of this format with room: go on in it
            path = segs[-1]
        else:  # a new one (never more records after a legacy segment's)
            index = max(self.index(segs[-1]) if segs else 0, past) + 1
            path = self.dir / f"seg-{index:08d}.log"
        if self._seq is None:
            self._seq = self._last_seq()
        created = meta is None
        if created:
            self._mark_new_format(self.index(path))
        # unbuffered: a write goes to the OS at once or raises, nothing is kept back; the
        # file, its size and its key become the log's together, once its header is written
        handle = open(path, "ab", buffering=0)  # noqa: SIM115 - held for the log's life
        try:
            if created:
                meta = (os.urandom(16), os.urandom(8))
                write_all(handle.fileno(), _header(*meta))
            size = os.fstat(handle.fileno()).st_size
        except BaseException:  # nothing of it is acknowledged: take the file back
            handle.close()
            try:
                if created:
                    path.unlink(missing_ok=True)
            except OSError as e:
                self._fail(e)
            raise
        self._file, self._size, self._meta = handle, size, meta
        if created:  # its name must be durable before a record in it is acknowledged
            try:
                fsync_dir(self.dir)
            except OSError as e:
                self._fail(e)
                raise

    def append(self, payload: bytes) -> tuple[int, int]:
        """-> the record's position (segment index, offset of its frame)."""
        return self.append_many((payload,))[0]

    def append_many(self, payloads: Sequence[bytes | tuple[bytes, ...]]) -> list[tuple[int, int]]:
        """Append records in order, as ``append`` of each would (the same frames, segment
        rotation at the same records), with one write, one flush and at most one fsync per
        segment touched. Returns once all are flushed (and fsynced with ``always``); -> each
        record's position, as ``read_from`` gives it. A record may come in parts (a tuple of
        bytes): its payload is their concatenation."""
        frames = []
        for payload in payloads:
            parts = payload if isinstance(payload, tuple) else (payload,)
            length = sum(len(part) for part in parts)
            if not 0 < length <= MAX_RECORD:
                raise ValueError(f"a record must have 1..{MAX_RECORD} bytes, got {length}")
            frames.append((length, parts))
        if not frames:
            return []
        if self.failed is not None:
            raise LogFailed(f"the replay log failed earlier ({self.failed!r}): restart the "
                            "service to recover from the disk")  # fmt: skip
        if self._file is None:
            self._open_segment()
        touched = [(Path(self._file.name), self._size)]  # where each segment it writes began
        seq = self._seq
        try:
            positions = self._append_frames(frames, touched)
        except OSError as e:
            self._seq = seq  # the undone records' numbers are used again
            self._undo(touched, e)
            raise
        if self.fsync == "interval":
            if self._syncer is None:
                self._syncer = threading.Thread(
                    target=self._sync_loop, name="replay-log-fsync", daemon=True
                )
                self._syncer.start()
            self._wake.set()
        return positions

    def _append_frames(self, frames, touched) -> list[tuple[int, int]]:
        position, chunk, positions = self._size, [], []
        segment = self.index(Path(self._file.name))
        for length, parts in frames:
            if position >= self.segment_bytes:  # rotate before this record, as append does
                self._write(chunk)
                with self._lock:  # with "always" the records before this append are
                    self._sync(own=self.fsync == "always")  # fsynced: only its own are here
                    self._file.close()
                    self._open_segment()
                touched.append((Path(self._file.name), self._size))
                position, chunk = self._size, []
                segment = self.index(Path(self._file.name))
            self._seq += 1
            key, marker = self._meta
            head = HEAD.pack(marker, length, self._seq, _mac(key, length, self._seq, parts))
            positions.append((segment, position))
            chunk.append(head)
            chunk.extend(parts)
            position += HEAD.size + length
        self._write(chunk)
        if self.fsync == "always":
            with self._lock:
                self._sync(own=True)
        return positions

    def _undo(self, touched: list[tuple[Path, int]], error: OSError) -> None:
        """Truncate every segment an append touched back to where it began, fsynced; if
        that fails too, the log has failed."""
        self.write_errors += 1
        print(f"replay log: append failed ({error!r}); undoing it", file=sys.stderr)
        with self._lock:
            try:
                if self._file is not None:
                    self._file.close()
                self._file = None
                for path, size in touched:
                    with open(path, "r+b", buffering=0) as f:
                        f.truncate(size)
                        fsync(f.fileno())
            except OSError as e:
                self._fail(e)

    def _fail(self, error: BaseException) -> None:
        if self.failed is None:
            self.failed = error
            print(f"replay log FAILED ({error!r}): nothing more is acknowledged; restart "
                  "the service to recover from the disk", file=sys.stderr)  # fmt: skip

    def read_at(self, positions: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """The payloads of the intact records at these positions (as ``append_many`` gave
        them); a position with no intact record there is left out. Reads only those frames,
        one open per segment; for the segment being written, what was flushed."""
        out: dict[tuple[int, int], bytes] = {}
        by_segment: dict[int, list[int]] = {}
        for segment, offset in positions:
            by_segment.setdefault(segment, []).append(offset)
        for segment, offsets in by_segment.items():
            path = self.dir / f"seg-{segment:08d}.log"
            if not path.is_file():
                continue
            with open(path, "rb") as f:
                meta = _segment_meta(f.read(HEADER))
                for offset in sorted(set(offsets)):
                    f.seek(offset)
                    if meta is not None:  # this format: marker, length, seq, MAC
                        head = f.read(HEAD.size)
                        if len(head) < HEAD.size or offset < HEADER:
                            continue
                        mark, length, seq, mac = HEAD.unpack(head)
                        if mark != meta[1] or not 0 < length <= MAX_RECORD:
                            continue
                        payload = f.read(length)
                        if len(payload) == length and _mac(meta[0], length, seq, (payload,)) == mac:
                            out[(segment, offset)] = payload
                        continue
                    head = f.read(FRAME.size)
                    if len(head) < FRAME.size:
                        continue
                    length, crc = FRAME.unpack(head)
                    if not 0 < length <= MAX_RECORD:
                        continue
                    payload = f.read(length)
                    if len(payload) == length and zlib.crc32(payload) == crc:
                        out[(segment, offset)] = payload
        return out

    def _write(self, parts: list[bytes]) -> None:
        if parts:
            data = b"".join(parts)
            write_all(self._file.fileno(), data)
            self._size += len(data)
            self._written += 1
            self.appended_bytes += len(data)

    def bytes_after(self, position: tuple[int, int]) -> int:
        """Bytes of the log at or after ``position`` (what a recovery from there reads)."""
        total = 0
        for path in self.segments():
            index = self.index(path)
            if index >= position[0]:
                size = path.stat().st_size
                total += max(0, size - position[1]) if index == position[0] else size
        return total

    @property
    def dirty(self) -> bool:
        """Appended records that no finished fsync covers yet."""
        return self._written != self._synced

    def sync(self) -> None:
        """fsync now whatever was appended (a checkpoint must never cover unsynced records)."""
        with self._lock:
            self._sync(force=True)

    def _sync(self, force: bool = False, own: bool = False) -> None:
        """fsync the open segment if anything is unsynced; call it holding ``_lock``. A
        failure fails the log unless ``own`` (the append whose records these are undoes
        itself: records before it were fsynced already)."""
        written = self._written
        if self._file is not None and (force or written != self._synced):
            try:
                fsync(self._file.fileno())
            except OSError as e:
                self.sync_errors += 1
                if not own:
                    self._fail(e)
                raise
        self._synced = max(self._synced, written)
        self._last_sync = time.monotonic()

    def _sync_loop(self) -> None:
        """fsync="interval": each appended record is fsynced at most ``fsync_interval_ms``
        (plus one fsync's duration) after it was appended, off the appending thread."""
        while not self._closing:  # checked after each round: a wake-up by close may
            self._wake.wait()  # have been cleared below
            if self._closing:
                return
            wait = self._last_sync + self.fsync_interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._wake.clear()  # appends from here on wake the next round
            try:
                with self._lock:
                    self._sync()
            except Exception as e:  # e.g. EIO: acknowledged records may be lost: failed
                self._fail(e)
                traceback.print_exc(file=sys.stderr)
                return

    def close(self) -> None:
        try:
            self._close_file()
        finally:
            if self._lock_file is not None:  # closing it releases the lock
                self._lock_file.close()
                self._lock_file = None

    def _close_file(self) -> None:
        if self._syncer is not None:
            self._closing = True
            self._wake.set()
            self._syncer.join()
            self._syncer, self._closing = None, False
        with self._lock:
            if self._file is not None:
                try:
                    if self.failed is None:
                        self._sync()
                finally:
                    self._file.close()
                    self._file = None
