"""The replay service's state, changed only by log records, and its snapshot.

Records (msgpack maps; ``k`` says which):
  ins {g, at}   a group (wire form) accepted at unix time ``at`` (``insert_record`` writes
                it with the group's validated msgpack bytes spliced in, not re-encoded)
  adm {a, p}    prompt-stream positions ``p`` granted to actor ``a``
  rel {a}       actor ``a`` restarted: its outstanding positions are handed out again
  ver {v}       the learner's version rose to ``v`` (stale groups are evicted)
  smp {ids, v, req?}  groups handed to the learner at version ``v``, answering the sample
                request ``req`` (older logs have no ``req``)
  rwd {c, s, o} the learner resumed from replay checkpoint ``c`` (a file name in
                ``checkpoints/``) covering the log up to (segment ``s``, offset ``o``): the
                state becomes that checkpoint's plus the ``ins``/``adm``/``rel`` records
                logged after it (``REWIND_KEEPS``). Applied by the server
                (``ReplayServer.rewind``), which needs the checkpoint and the log

Invariants:
- ``apply`` (and, for ``rwd``, a rebuild from a checkpoint and ``apply``) is the only way
  the state changes, so replaying the log in order rebuilds the state exactly: the same
  groups in the same order with the same sample counts and insert times, the same
  evictions, work dispatch and rate-limiter counters, and the answers to the last
  ``ANSWERS_KEPT`` sample requests (``answers``: request id -> the groups' bytes and
  per-group info as first sent, kept even when the groups were used up), so that a retry
  of a sample whose answer a crash lost gets that same answer from the restarted server;
- a rewind (``rwd``) changes no group's acknowledgement and no work dispatch: ``seen``,
  ``inserted``, the cursor, outstanding and redo positions are as before it;
- ``snapshot()`` is plain msgpack-able data and ``restore(snapshot())`` gives a state whose
  ``snapshot()`` is equal. Runtime figures (duplicates, rejected requests) and the
  selector's RNG are not part of the state: a restart counts duplicates from zero and
  reseeds the RNG, the same with or without a checkpoint.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict

import msgpack

from flowrl_async.replay.buffer import Counters, Entry, ReplayBuffer
from flowrl_async.replay.dedup import Dedup
from flowrl_async.replay.rate_limiter import RateLimiter
from flowrl_async.wire import GroupInfo, WireLimits, check_group

ANSWERS_KEPT = 8  # sample answers a retry can still get, across restarts too
REWIND_KEEPS = ("ins", "adm", "rel")  # records after the checkpoint that a rewind re-applies
RUNTIME_COUNTERS = ("duplicates",)  # counted since the process started, not recovered
_PACKER = msgpack.Packer(use_bin_type=True)
_INS_HEAD = b"".join((_PACKER.pack_map_header(3), *map(_PACKER.pack, ("k", "ins", "g"))))


def insert_record(group_bytes: bytes, at: float) -> tuple[bytes, bytes, bytes]:
    """The ``ins`` record as msgpack, in three parts to concatenate (the log takes them as
    they are): the same as ``packb({"k": "ins", "g": <the group map>, "at": at})``, with the
    group's bytes (one encoded map) spliced in, not re-encoded."""
    return _INS_HEAD, group_bytes, _PACKER.pack("at") + _PACKER.pack(at)


class ReplayState:
    """The service's state, changed only by applying log records."""

    def __init__(
        self,
        buffer: ReplayBuffer,
        limiter: RateLimiter | None = None,
        limits: WireLimits = WireLimits(),
    ):
        self.buffer, self.limiter, self.limits = buffer, limiter, limits
        self.outstanding: dict[int, set[int]] = {}  # actor -> positions granted, not yet in
        self.redo: list[int] = []  # positions of restarted actors, handed out first
        self.cursor = 0  # the next new position in the prompt stream
        # request id -> (groups' bytes, [times_sampled, staleness, inserted_at] per group,
        # how a snapshot holds each group: ``_ref``)
        self.answers: OrderedDict[str, tuple[list[bytes], list[list], list]] = OrderedDict()

        self.dropped_on_restore = 0  # held groups a restored snapshot had that fail checks
        # checkpoints that logged rwd records name: a full-log recovery needs them (prune
        # keeps them)
        self.rewinds: set[str] = set()

    def _valid(self, payload: bytes) -> bool:
        try:
            check_group(msgpack.unpackb(payload, raw=False), self.limits)
        except Exception:
            return False
        return True

    @property
    def in_flight(self) -> int:
        return sum(len(p) for p in self.outstanding.values())

    def apply(
        self,
        record: dict,
        info: GroupInfo | None = None,
        group_bytes: bytes | None = None,
        where: tuple[int, int] | None = None,
    ) -> None:
        """Apply one record. For ``ins``, ``info`` and ``group_bytes`` are what validating
        ``record["g"]`` gave and its msgpack bytes (the server passes both, so nothing is
        validated or encoded twice); without ``info`` the group is validated here, without
        ``group_bytes`` encoded once. ``where``: the record's log position."""
        kind = record["k"]
        if kind == "ins":
            obj = record["g"]
            info = info or check_group(obj, self.limits)
            at = record.get("at")
            entry = Entry(
                info.group_id,
                info.min_version,
                group_bytes if group_bytes is not None else msgpack.packb(obj, use_bin_type=True),
                priority=info.reward_spread,
                inserted_at=float(at) if isinstance(at, int | float) else time.time(),
                where=where,
            )
            if self.buffer.insert(entry):
                self.outstanding.get(info.actor_id, set()).discard(info.cursor)
                # the limiter counts only groups the buffer keeps: one stale on arrival
                # would raise its diff with nothing to sample (inserts and samples held)
                if self.limiter is not None and info.group_id in self.buffer.entries:
                    self.limiter.record_insert()
        elif kind == "adm":
            positions = record["p"]
            self.outstanding.setdefault(record["a"], set()).update(positions)
            granted = set(positions)
            self.redo = [p for p in self.redo if p not in granted]
            self.cursor = max([self.cursor, *(p + 1 for p in positions)])
        elif kind == "rel":
            self.redo = sorted(set(self.redo) | self.outstanding.pop(record["a"], set()))
        elif kind == "ver":
            self.buffer.evict_stale(record["v"])
        elif kind == "smp":
            self.buffer.evict_stale(record["v"])
            if isinstance(record.get("req"), str):
                self._keep_answer(record["req"], record["ids"])
            n = self.buffer.mark_sampled(record["ids"])
            if self.limiter is not None:
                self.limiter.record_sample(n)
        else:
            raise KeyError(kind)

    def _keep_answer(self, req: str, ids: list[str]) -> None:
        """The answer to sample request ``req``, as the server sends it (``times_sampled``
        counts this sample too); read before the groups are marked sampled, since used-up
        ones leave the buffer."""
        entries = [self.buffer.entries.get(i) for i in ids]
        if any(e is None for e in entries):  # a damaged log lost one: no answer to repeat
            return
        self.answers[req] = (
            [e.payload for e in entries],
            [[e.times_sampled + 1, self.buffer.staleness(e), e.inserted_at] for e in entries],
            [_ref(e.payload, e.where, e.group_id) for e in entries],
        )
        self.answers.move_to_end(req)
        while len(self.answers) > ANSWERS_KEPT:
            self.answers.popitem(last=False)

    def lowest_segment(self) -> int | None:
        """The lowest log segment a held group or a kept sample answer is read from (its
        ``ins`` record); None when none is."""
        found = [e.where[0] for e in self.buffer.entries.values() if e.where is not None]
        found += [r[0] for _, _, refs in self.answers.values() for r in refs if isinstance(r, list)]
        return min(found) if found else None

    # ---------------------------------------------------------------- snapshot
    def snapshot(self) -> dict:
        b = self.buffer
        counters = {k: v for k, v in asdict(b.counters).items() if k not in RUNTIME_COUNTERS}
        return {
            "entries": [
                [e.group_id, e.min_version, _ref(e.payload, e.where, e.group_id), e.priority]
                + [e.inserted_at, e.times_sampled]
                for e in b.entries.values()
            ],
            "dedup": b.seen.snapshot(),
            "counters": counters,
            "version": b.version,
            "newest": b.newest_version,
            "cursor": self.cursor,
            "outstanding": [[a, sorted(p)] for a, p in sorted(self.outstanding.items())],
            "redo": list(self.redo),
            "limiter": None
            if self.limiter is None
            else [self.limiter.inserts, self.limiter.samples],
            "answers": [[req, refs, info] for req, (_, info, refs) in self.answers.items()],
            "rewinds": sorted(self.rewinds),
        }

    def restore(self, snap: dict, read_log=None) -> None:
        """Replace the state with a snapshot (the buffer's settings stay as configured).
        ``read_log``: ``SegmentLog.read_at`` of the log, for the groups the snapshot refers
        to by their ``ins`` record's position; a group not intact there raises ValueError."""
        refs = [x[2] for x in snap["entries"]]
        refs += [ref for _, group_refs, _ in snap.get("answers", []) for ref in group_refs]
        groups = _read_groups(refs, read_log)
        b = self.buffer
        b.entries.clear()
        for gid, min_version, ref, priority, inserted_at, times_sampled in snap["entries"]:
            if isinstance(ref, list) and ref[2:] != [gid]:
                raise ValueError(f"entry {gid!r} refers to {ref!r}")
            payload, where = groups(ref)
            if not self._valid(payload):  # e.g. a poison group from before ids were checked
                self.dropped_on_restore += 1
                continue
            b.entries[gid] = Entry(
                gid, min_version, payload, priority, inserted_at, times_sampled, where
            )
        b.seen = Dedup.restore(snap.get("dedup"), snap.get("seen"))  # "seen": every id (older)
        b.counters = Counters(**snap["counters"], duplicates=b.counters.duplicates)
        b.version = snap["version"]
        # a snapshot from before it was kept: the newest group it still holds
        b.newest_version = snap.get("newest", max((e.min_version for e in b.entries.values()),
                                                  default=0))  # fmt: skip
        b.restored()
        self.cursor = snap["cursor"]
        self.rewinds = set(snap.get("rewinds", []))
        self.outstanding = {a: set(p) for a, p in snap["outstanding"]}
        self.redo = list(snap["redo"])
        if self.limiter is not None:
            # a snapshot taken without a limiter: its counters are what replaying the log
            # with one would have counted (every accepted insert, every sampled group)
            counts = snap["limiter"] or [b.counters.inserted, b.counters.sampled_groups]
            self.limiter.inserts, self.limiter.samples = counts
        self.answers = OrderedDict()  # a checkpoint from before answers were kept: none
        for req, refs, info in snap.get("answers", []):
            payloads = [groups(ref)[0] for ref in refs]
            self.answers[req] = (payloads, [list(i) for i in info], list(refs))


def _ref(payload: bytes, where: tuple[int, int] | None, group_id: str):
    """How a snapshot holds a group: [segment, offset, group id] of its ``ins`` record in
    the log when known (a checkpoint stays small whatever the groups' size), else its bytes."""
    return payload if where is None else [where[0], where[1], group_id]


def _read_groups(refs: list, read_log):
    """-> a function from a snapshot's reference to a group (``_ref``) to (bytes, where),
    reading every referred record from the log at once. A reference whose record is not
    intact, or holds another group, raises ValueError."""
    positions = {(r[0], r[1]) for r in refs if isinstance(r, list)}
    if positions and read_log is None:
        raise ValueError("this snapshot refers to the log: restore it with read_log")
    records = read_log(sorted(positions)) if positions else {}

    def group(ref) -> tuple[bytes, tuple[int, int] | None]:
        if isinstance(ref, bytes):
            return ref, None
        if isinstance(ref, dict):  # a checkpoint that stored the group's map
            return msgpack.packb(ref, use_bin_type=True), None
        if len(ref) != 3:
            raise ValueError(f"bad group reference {ref!r}")
        where, group_id = (ref[0], ref[1]), ref[2]
        payload = records.get(where)
        found = _group_in(payload) if payload is not None else None
        if found is None:
            raise ValueError(f"no intact insert record at log position {where}")
        if found[1] != group_id:
            raise ValueError(f"log position {where} holds group {found[1]!r}, not {group_id!r}")
        return found[0], where

    return group


_AT_KEY = _PACKER.pack("at")


def group_bytes_in(payload: bytes) -> bytes | None:
    """The group's bytes inside an ``ins`` record as ``insert_record`` writes it (the
    layout of ``packb({"k": "ins", "g": ..., "at": <float>})`` too); None for anything else."""
    found = _group_in(payload)
    return None if found is None else found[0]


def _group_in(payload: bytes) -> tuple[bytes, object] | None:
    """(the group's bytes, its id) of an ``ins`` record's payload; None for another layout."""
    n = len(_INS_HEAD)
    if len(payload) <= n + 12 or not payload.startswith(_INS_HEAD):
        return None
    if payload[-12:-9] != _AT_KEY or payload[-9] != 0xCB:  # "at", then a float 64
        return None
    raw = payload[n:-12]
    try:  # exactly one msgpack map: the group
        obj = msgpack.unpackb(raw, raw=False)
    except Exception:
        return None
    return (raw, obj.get("id")) if isinstance(obj, dict) else None
