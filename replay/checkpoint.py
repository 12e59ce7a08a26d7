"""Atomic checkpoints of the replay state, each tied to the log position it covers.

A checkpoint file holds two frames in the log's framing (``<u32 length><u32 crc32>``): a
small header ``{format, segment, offset, tag, created}`` and the state snapshot
(``ReplayState.snapshot()``), both msgpack.

Invariants:
- a checkpoint file is complete or absent: it is written to a temporary file in the same
  directory, fsynced, ``os.replace``d onto its name, and the directory is fsynced;
- it covers exactly the log records before ``(segment, offset)``; the caller fsyncs the log
  up to there first, so a crash can never leave a checkpoint ahead of the log it covers;
- ``candidates`` lists the checkpoints of a directory newest first (by covered position,
  then creation time); a damaged one (bad CRC, unreadable) is skipped by ``load``;
- a snapshot holds a group by the log position of its ``ins`` record (format 2), so a
  checkpoint's size does not grow with the groups' size, and the log segments it refers to
  must stay (nothing deletes segments); ``prune`` deletes all but the newest and the named
  ones (the learner names those its own kept checkpoints refer to).
"""

from __future__ import annotations

import os
import re
import time
import zlib
from pathlib import Path

import msgpack

from flowrl_async.replay import log as _log
from flowrl_async.replay.log import FRAME

FORMAT = 2  # 2: groups held by reference to their ``ins`` record in the log
READABLE = (1, 2)
TAG = re.compile(r"[A-Za-z0-9_.-]{0,64}")
NAME = re.compile(r"ckpt-\d{8}-\d{12}(-[A-Za-z0-9_.-]{1,64})?\.ckpt")  # default_name's


def default_name(position: tuple[int, int], tag: str = "") -> str:
    return f"ckpt-{position[0]:08d}-{position[1]:012d}{'-' + tag if tag else ''}.ckpt"


def check_tag(tag: object) -> str:
    if not isinstance(tag, str) or not TAG.fullmatch(tag):
        raise ValueError(f"checkpoint tag must match {TAG.pattern}, got {tag!r}")
    return tag


def _frame(obj: object) -> bytes:
    payload = msgpack.packb(obj, use_bin_type=True)
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def fsync(fd: int) -> None:
    _log.fsync(fd)  # the log's I/O seam, so fault injection sees checkpoints too


def fsync_dir(path: Path) -> None:
    _log.fsync_dir(path)


def write(path: Path, snapshot: dict, position: tuple[int, int], tag: str = "",
          needs: int | None = None) -> dict:  # fmt: skip
    """Write atomically; -> the header. ``needs``: the lowest log segment the snapshot
    refers to (retention keeps the log from the lowest ``needs`` of the kept checkpoints)."""
    header = {
        "format": FORMAT,
        "segment": position[0],
        "offset": position[1],
        "tag": check_tag(tag),
        "created": time.time(),
        "needs": position[0] if needs is None else min(needs, position[0]),
    }
    _log.make_dirs(path.parent)  # a new directory's name is durable once its parent is fsynced
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(_frame(header))
        f.write(_frame(snapshot))
        f.flush()
        fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return header


def _read_frame(f) -> object | None:
    head = f.read(FRAME.size)
    if len(head) < FRAME.size:
        return None
    length, crc = FRAME.unpack(head)
    payload = f.read(length)
    if len(payload) != length or zlib.crc32(payload) != crc:
        return None
    return msgpack.unpackb(payload, raw=False, strict_map_key=False)


def read_header(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            header = _read_frame(f)
    except (OSError, ValueError, msgpack.UnpackException):
        return None
    ok = isinstance(header, dict) and header.get("format") in READABLE
    return header if ok else None


def load(path: Path) -> tuple[dict, dict] | None:
    """-> (header, snapshot), or None when the file is damaged."""
    try:
        with open(path, "rb") as f:
            header, snapshot = _read_frame(f), _read_frame(f)
    except (OSError, ValueError, msgpack.UnpackException):
        return None
    if not isinstance(header, dict) or header.get("format") not in READABLE:
        return None
    return (header, snapshot) if isinstance(snapshot, dict) else None


def candidates(directory: Path) -> list[Path]:
    """Checkpoints in ``directory``, newest first; files without a readable header left out."""
    found = []
    for path in directory.glob("*.ckpt") if directory.is_dir() else []:
        header = read_header(path)
        if header is not None:
            found.append(((header["segment"], header["offset"], header["created"]), path))
    return [path for _, path in sorted(found, reverse=True)]


def prune(directory: Path, keep: set[str]) -> list[Path]:
    """Delete the checkpoints of ``directory`` except those named in ``keep`` and the newest
    (files without a readable header are left alone); -> the deleted paths."""
    gone = [path for path in candidates(directory)[1:] if path.name not in keep]
    for path in gone:
        path.unlink(missing_ok=True)
    return gone
