"""An append-only log of segment files with length + CRC32 framing.

Record frame: ``<u32 length><u32 crc32(payload)><payload>`` (little endian). Segments are
``seg-%08d.log`` and rotate when they pass ``segment_bytes``.

Invariants:
- ``append`` returns only after the record is written and flushed to the OS; it is fsynced
  before return with ``fsync="always"``, at most ``fsync_interval_ms`` later with
  ``fsync="interval"``, and left to the OS with ``fsync="never"``;
- ``read_all`` yields every intact record in order (from a ``position()``, for recovery
  after a checkpoint); a torn tail (a partial last frame) is truncated away, and a record
  whose CRC does not match is skipped; both are counted. After damage (a bad CRC or a
  length that does not fit) reading resumes at the next offset where an intact frame
  starts, so one bad byte, in a payload or a length field, loses one record; the skipped
  stretch counts once in ``corrupt_skipped``. Damage with no intact frame after it is a torn
  tail: its bytes are counted and, in the last segment, truncated.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

FRAME = struct.Struct("<II")
FSYNC_POLICIES = ("always", "interval", "never")
MAX_RECORD = 1 << 30


@dataclass
class RecoveryReport:
    records: int = 0
    corrupt_skipped: int = 0
    torn_bytes_truncated: int = 0


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
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes, self.fsync = segment_bytes, fsync
        self.fsync_interval = fsync_interval_ms / 1000.0
        self._file = None
        self._last_sync = time.monotonic()
        self._dirty = False

    def segments(self) -> list[Path]:
        return sorted(self.dir.glob("seg-*.log"))

    @staticmethod
    def index(path: Path) -> int:
        return int(path.stem.split("-")[1])

    def position(self) -> tuple[int, int]:
        """(segment index, byte offset) just past the last record written: what a checkpoint
        covers. Records appended later sort after it; (0, 0) before the first record."""
        if self._file is not None:
            return self.index(Path(self._file.name)), self._file.tell()
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
        report = report if report is not None else RecoveryReport()
        segs = [p for p in self.segments() if self.index(p) >= start[0]]
        for i, path in enumerate(segs):
            data = path.read_bytes()
            pos = start[1] if self.index(path) == start[0] else 0
            while pos < len(data):
                payload = _frame_at(data, pos)
                if payload is not None:
                    report.records += 1
                    yield payload
                    pos += FRAME.size + len(payload)
                    continue
                # damaged here: a bad CRC or a length that does not fit. Resume at the next
                # intact frame; with none left, the rest is a torn tail.
                nxt = next((q for q in range(pos + 1, len(data)) if _frame_at(data, q)), None)
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

    def roll(self) -> None:
        """Write the next record to a new segment."""
        self.close()
        self._open_segment(new=True)

    def _open_segment(self, new: bool = False) -> None:
        segs = self.segments()
        if segs and not new and segs[-1].stat().st_size < self.segment_bytes:
            path = segs[-1]
        else:
            index = self.index(segs[-1]) + 1 if segs else 1
            path = self.dir / f"seg-{index:08d}.log"
        self._file = open(path, "ab")  # noqa: SIM115 - held open for the log's lifetime

    def append(self, payload: bytes) -> None:
        if not payload or len(payload) > MAX_RECORD:
            raise ValueError(f"a record must have 1..{MAX_RECORD} bytes, got {len(payload)}")
        if self._file is None:
            self._open_segment()
        elif self._file.tell() >= self.segment_bytes:
            self._sync()
            self._file.close()
            self._open_segment()
        self._file.write(FRAME.pack(len(payload), zlib.crc32(payload)))
        self._file.write(payload)
        self._file.flush()
        self._dirty = True
        if self.fsync == "always":
            self._sync()
        elif self.fsync == "interval":
            self.maybe_sync()

    def sync(self) -> None:
        """fsync now whatever was appended (a checkpoint must never cover unsynced records)."""
        self._dirty = True
        self._sync()

    def maybe_sync(self) -> None:
        if self._dirty and time.monotonic() - self._last_sync >= self.fsync_interval:
            self._sync()

    def _sync(self) -> None:
        if self._file is not None and self._dirty:
            os.fsync(self._file.fileno())
        self._dirty = False
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self._sync()
            self._file.close()
            self._file = None
