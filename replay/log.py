"""An append-only log of segment files with length + CRC32 framing.

Record frame: ``<u32 length><u32 crc32(payload)><payload>`` (little endian). Segments are
``seg-%08d.log`` and rotate when they pass ``segment_bytes``.

Invariants:
- ``append`` returns only after the record is written and flushed to the OS; it is fsynced
  before return with ``fsync="always"``, at most ``fsync_interval_ms`` later with
  ``fsync="interval"``, and left to the OS with ``fsync="never"``;
- ``read_all`` yields every intact record in order; a torn tail (a partial last frame) is
  truncated away, and a record whose CRC does not match is skipped; both are counted.
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

    def read_all(self, report: RecoveryReport | None = None) -> Iterator[bytes]:
        """Every intact record, oldest first. Truncates a torn tail of the last segment."""
        report = report if report is not None else RecoveryReport()
        segs = self.segments()
        for i, path in enumerate(segs):
            data = path.read_bytes()
            pos = 0
            while pos < len(data):
                if pos + FRAME.size > len(data):
                    break
                length, crc = FRAME.unpack_from(data, pos)
                end = pos + FRAME.size + length
                if length > MAX_RECORD or end > len(data):
                    break
                payload = data[pos + FRAME.size : end]
                if zlib.crc32(payload) == crc:
                    report.records += 1
                    yield payload
                else:
                    report.corrupt_skipped += 1
                pos = end
            if pos < len(data):
                report.torn_bytes_truncated += len(data) - pos
                if i == len(segs) - 1:
                    with open(path, "r+b") as f:
                        f.truncate(pos)
                        os.fsync(f.fileno())

    def _open_segment(self) -> None:
        segs = self.segments()
        if segs and segs[-1].stat().st_size < self.segment_bytes:
            path = segs[-1]
        else:
            index = int(segs[-1].stem.split("-")[1]) + 1 if segs else 1
            path = self.dir / f"seg-{index:08d}.log"
        self._file = open(path, "ab")  # noqa: SIM115 - held open for the log's lifetime

    def append(self, payload: bytes) -> None:
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
