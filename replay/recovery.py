"""Bringing a replay state back from disk.

``recover``: on start, the newest intact checkpoint plus every log record after the position
it covers (a record that does not decode or apply is skipped and counted; an ``rwd`` record
is redone with ``rewound``). ``rewound``: the state of an older checkpoint plus the records
of ``REWIND_KEEPS`` logged after it (what a ``rewind`` request makes: see the server).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from flowrl_async.replay import checkpoint as ckpt
from flowrl_async.replay.log import RecoveryReport, SegmentLog
from flowrl_async.replay.state import REWIND_KEEPS, ReplayState, group_bytes_in


@dataclass
class Recovered:
    """The state recovery rebuilt, and how."""

    state: ReplayState
    report: RecoveryReport = field(default_factory=RecoveryReport)
    checkpoint: str = ""  # the checkpoint file it started from ("" for none)
    rewind_errors: int = 0  # rwd records that could not be redone (checkpoint gone)
    start: tuple[int, int] = (0, 0)  # the log position reading began at


def recover(
    log: SegmentLog, checkpoint_dir: Path, new_state: Callable[[], ReplayState]
) -> Recovered:
    """The state that ``log`` and the checkpoints in ``checkpoint_dir`` hold. Truncates a torn
    tail of the log; when the log ends before the checkpoint, rolls to a fresh segment so that
    new records sort after it."""
    out, start = Recovered(new_state()), (0, 0)
    for path in ckpt.candidates(checkpoint_dir):
        loaded = ckpt.load(path)
        if loaded is None:
            continue
        header, snapshot = loaded
        try:
            out.state.restore(snapshot, log.read_at)
        except (KeyError, TypeError, ValueError):
            out.state = new_state()
            continue
        start, out.checkpoint = (header["segment"], header["offset"]), str(path)
        break
    for position, payload in log.read_from(out.report, start):
        try:
            record = msgpack.unpackb(payload, raw=False)
        except Exception:  # a record that does not decode: skipped, counted
            out.report.corrupt_skipped += 1
            continue
        if isinstance(record, dict) and record.get("k") == "rwd":
            named = out.state.rewinds | {str(record.get("c"))}
            try:
                out.state = rewound(
                    log,
                    checkpoint_dir,
                    new_state,
                    record["c"],
                    position,
                    (record["s"], record["o"]),
                )
            except Exception as e:  # its checkpoint is gone: the state stays as it was
                out.rewind_errors += 1
                print(f"replay recovery: cannot redo rewind {record!r}: {e}", file=sys.stderr)
            out.state.rewinds = named
            continue
        try:
            if isinstance(record, dict) and record.get("k") == "ins":
                # the group's bytes as logged (not encoded again), and where they are
                out.state.apply(record, *_ins_bytes(payload, position))
            else:
                out.state.apply(record)
        except Exception:  # a record that does not apply: skipped, counted
            out.report.corrupt_skipped += 1
    out.start = start
    covered = max(start, _newest_covered(checkpoint_dir))
    if log.position() < covered:
        # the log ends before a checkpoint (lost after its fsync?): write new records to a
        # fresh segment numbered past the checkpoint's, so that they sort after it (the next
        # recovery starts reading there) and never take the places of records it refers to
        # (one that failed to restore stays a candidate for the next start)
        log.roll(past=covered[0])
    return out


def _newest_covered(checkpoint_dir: Path) -> tuple[int, int]:
    """The furthest log position any readable checkpoint in ``checkpoint_dir`` covers."""
    for path in ckpt.candidates(checkpoint_dir):  # newest (furthest) first
        header = ckpt.read_header(path)
        if header is not None:
            return header["segment"], header["offset"]
    return 0, 0


def rewound(
    log: SegmentLog,
    checkpoint_dir: Path,
    new_state: Callable[[], ReplayState],
    name: str,
    end: tuple[int, int],
    covered: tuple[int, int],
    loaded=None,
) -> ReplayState:
    """Checkpoint ``name`` (it must cover the log up to ``covered``) plus the records
    of ``REWIND_KEEPS`` logged after it and before ``end``: a new state."""
    loaded = loaded or ckpt.load(checkpoint_dir / name)
    if loaded is None:
        raise ValueError(f"no intact checkpoint {name} in {checkpoint_dir}")
    header, snapshot = loaded
    covered = tuple(covered)
    if (header["segment"], header["offset"]) != covered or covered > end:
        raise ValueError(f"checkpoint {name} covers {header}, not {covered} before {end}")
    state = new_state()
    state.restore(snapshot, log.read_at)
    state.answers.clear()
    for position, payload in log.read_from(start=covered, truncate=False, end=end):
        try:
            record = msgpack.unpackb(payload, raw=False)
            if record["k"] == "ins":
                state.apply(record, *_ins_bytes(payload, position))
            elif record["k"] in REWIND_KEEPS:
                state.apply(record)
        except Exception:  # skipped, as recovery skips it (counted there)
            continue
    return state


def _ins_bytes(
    payload: bytes, position: tuple[int, int]
) -> tuple[None, bytes | None, tuple | None]:
    """``apply``'s (info, group_bytes, where) for an ``ins`` record read at ``position``: the
    group's bytes as logged and where they are, or (None, None, None) for a record of
    another layout (encoded again, and held by value in checkpoints)."""
    raw = group_bytes_in(payload)
    return (None, None, None) if raw is None else (None, raw, position)
