"""The replay service: one process owning the buffer, serving actors and the learner over zmq.

The protocol (every request and its reply) is in ``flowrl_async/replay/protocol.py``.

Invariants: an insert is acknowledged only after its record is in the log; every state
change is a log record (``flowrl_async.replay.state``), so after a restart the buffer holds
exactly the acknowledged groups that were not yet used up, with their sample counts. Every
group from a client is fully validated once, on insert; the server keeps its validated
msgpack bytes and writes them to the log and into ``batch`` replies as they are (clients
decode replies with ``wire.group_from_wire_trusted``).
Recovery loads the newest intact checkpoint and applies only the records after the log
position it covers. When the log fails (replay/log.py: a failed fsync, or a failed write it
could not undo) the server stops serving: a restart recovers what the disk holds. Every malformed request gets exactly one error reply and is counted
once; the server never dies on bad input (an unexpected exception is answered with an error
too and counted in ``internal_errors``). Held inserts are answered in arrival order; a
retry of a held insert (same group id, in an ``insert`` or ``insert_batch``) or sample (same
``req``) replaces the held one: an earlier ``insert`` is not answered; an earlier batch gets
``timeout`` for that group (resending is safe), so that the rest of it is answered.

Run: python -m flowrl_async.replay.server --dir RUN_DIR/replay --address tcp://127.0.0.1:5555
(port 0 picks a free port; the first line printed names the bound address). The rate
limiter is off unless ``--samples-per-insert`` is given (with ``--min-size-to-sample``,
``--error-buffer``, ``--insert-timeout-ms``). ``--curve-secret-key FILE`` (and optionally
``--curve-authorized-keys DIR``) turns on ZeroMQ CURVE encryption (replay/curve.py).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import msgpack
import zmq

from flowrl_async.heap import Refreezer, freeze_survivors
from flowrl_async.replay import checkpoint as ckpt
from flowrl_async.replay import decisions
from flowrl_async.replay.buffer import ReplayBuffer
from flowrl_async.replay.config import ServerConfig, parse_args
from flowrl_async.replay.curve import ANY, RECHECK_S, ServerCurve, allowed
from flowrl_async.replay.dedup import EXPIRED, NEW, SEEN, split_id
from flowrl_async.replay.held import SUPERSEDED, BatchReply, Held, HeldInsert, HeldRequests
from flowrl_async.replay.log import SegmentLog
from flowrl_async.replay.metrics import ServiceMetrics
from flowrl_async.replay.protocol import REQUESTS
from flowrl_async.replay.recovery import recover, rewound
from flowrl_async.replay.state import ReplayState, insert_record
from flowrl_async.wire import (
    ACCEPTED,
    DUPLICATE,
    REJECTED,
    TIMEOUT,
    GroupInfo,
    Packed,
    WireError,
    WireLimits,
    check_group,
    decode,
    encode,
    max_array_len,
    unpack_group,
)

MAX_VERSION = 1 << 53  # no weight version of a real run comes near it
REPLY_HEADROOM = 1 << 20  # bytes a batch reply needs beside its groups' (envelope, info)
FREEZE_EVERY = 4096  # inserts between two freezes (flowrl_async/heap.py)
ZERO_COPY_BYTES = 1 << 16  # replies from this size on are handed to zmq without a copy


class ReplayServer:
    """The replay service: one process owning the buffer, serving over zmq."""

    def __init__(self, cfg: ServerConfig, limits: WireLimits = WireLimits()):
        if cfg.vocab_size is not None:
            limits = replace(limits, vocab_size=cfg.vocab_size)
        self.cfg, self.limits = cfg, limits
        self.curve = None  # keys are checked before anything else starts
        if cfg.curve_secret_key is not None:
            self.curve = ServerCurve.from_files(cfg.curve_secret_key, cfg.curve_authorized_keys)
        elif cfg.curve_authorized_keys is not None:
            raise ValueError("curve_authorized_keys needs curve_secret_key (the server's keys)")
        self.log = SegmentLog(cfg.directory, cfg.segment_bytes, cfg.fsync, cfg.fsync_interval_ms)
        self.log.lock()  # one server per directory, before recovery touches anything
        self.checkpoint_dir = Path(cfg.directory) / "checkpoints"
        self.rejected = 0  # malformed requests (each answered with one error)
        self.internal_errors = 0  # unexpected exceptions while handling a request
        self.insert_timeouts = 0  # inserts held by the rate limiter past their timeout
        self.starved = False  # the last sample the limiter allowed found too few groups
        self.retired_segments = 0  # log segments deleted by retention (retain="needed")
        self.dedup_expired = 0  # inserts refused: too old to tell from a retry (dedup.py)
        recovered = recover(self.log, self.checkpoint_dir, self._new_state)
        self.state, self.recovery = recovered.state, recovered.report
        self.recovered_checkpoint = recovered.checkpoint
        self.rewind_errors = recovered.rewind_errors  # rwd records it could not redo
        # log bytes a restart would replay beyond the newest checkpoint (bounded by
        # checkpoint_every_mb): counted from the recovery's own starting point
        self._unckpt_base = self.log.appended_bytes - self.log.bytes_after(recovered.start)
        self._stop = threading.Event()
        self.held = HeldRequests()
        # state changes applied, and their count when the held samples were last tried
        self._changes, self._tried_at = 0, -1
        self._sock = None
        self._ctx = self._auth = None  # with CURVE: this server's context and ZAP handler
        self._keys = None  # with authorized keys: each request's role (replay/curve.py)
        self.bound_address: str | None = None
        self._refreezer = Refreezer(FREEZE_EVERY)  # held groups out of full collections
        self.metrics = ServiceMetrics()

    def _new_state(self) -> ReplayState:
        return decisions.new_state(self.cfg, self.limits)

    @property
    def buffer(self) -> ReplayBuffer:
        return self.state.buffer

    # ---------------------------------------------------------------- state and recovery
    def _record(self, record: dict) -> None:
        """Log, then apply: the only way the state changes while serving (with ``_inserts``
        and ``rewind``)."""
        self.log.append(msgpack.packb(record, use_bin_type=True))
        self.state.apply(record)
        self._changes += 1

    def _inserts(self, accepted: list[tuple[GroupInfo, dict, bytes]]) -> None:
        """Log ``ins`` records for validated new groups (info, map, bytes) with one append,
        then apply them: the groups' bytes go to the log and the buffer as they are."""
        at = time.time()
        positions = self.log.append_many([insert_record(raw, at) for _, _, raw in accepted])
        for (info, obj, raw), where in zip(accepted, positions, strict=True):
            self.state.apply({"k": "ins", "g": obj, "at": at}, info, raw, where)
        self._changes += 1
        self._refreezer.add(len(accepted))
        self.metrics.inserted(len(accepted))

    def checkpoint(self, path: str | Path | None = None, tag: str = "") -> dict:
        """Write the state and the log position it covers, atomically; -> header + path.

        Default path: ``<dir>/checkpoints/ckpt-<segment>-<offset>[-tag].ckpt``, the only
        place recovery looks. Call it on the serving thread (the ``checkpoint`` request) or
        while the server is not serving.
        """
        self.log.sync()
        position = self.log.position()
        path = (
            Path(path)
            if path is not None
            else self.checkpoint_dir / ckpt.default_name(position, ckpt.check_tag(tag))
        )
        header = ckpt.write(path, self.state.snapshot(), position, tag,
                            self.state.lowest_segment())  # fmt: skip
        if path.parent == self.checkpoint_dir:  # recovery can start here from now on
            self._unckpt_base = self.log.appended_bytes
            if self.cfg.retain == "needed":
                self.retire_segments()
        return {**header, "path": str(path)}

    def retire_segments(self) -> list[str]:
        """Delete the log segments below every one the live state or a kept checkpoint
        still reads (a checkpoint without that figure keeps everything); never the one
        being written. -> the deleted file names."""
        needed = [self.log.position()[0]]
        if (low := self.state.lowest_segment()) is not None:
            needed.append(low)
        for path in ckpt.candidates(self.checkpoint_dir):
            header = ckpt.read_header(path)
            needed.append(0 if header is None else int(header.get("needs", 0)))
        floor = min(needed)
        gone = [p for p in self.log.segments() if self.log.index(p) < floor]
        for path in gone:
            path.unlink(missing_ok=True)
        self.retired_segments += len(gone)
        return [p.name for p in gone]

    AUTO_TAG, AUTO_KEPT = "auto", 2

    def maybe_checkpoint(self) -> dict | None:
        """The service's own checkpoint once ``checkpoint_every_mb`` of log was written since
        the last one; older ones of its own beyond ``AUTO_KEPT`` are deleted (never the
        learner's, nor one a rwd record names)."""
        every = self.cfg.checkpoint_every_mb
        if every is None or self.log.appended_bytes - self._unckpt_base < every * 2**20:
            return None
        try:
            info = self.checkpoint(tag=self.AUTO_TAG)
        except Exception:
            self._unckpt_base = self.log.appended_bytes  # try again a period later
            raise
        own = [p for p in ckpt.candidates(self.checkpoint_dir)
               if p.name.endswith(f"-{self.AUTO_TAG}.ckpt") and p.name not in self.state.rewinds]  # fmt: skip
        for old in own[self.AUTO_KEPT :]:  # candidates: newest first
            old.unlink(missing_ok=True)
        return info

    def rewind(self, checkpoint: str) -> dict:
        """The learner resumed from the state it had when replay checkpoint ``checkpoint``
        (a file of ``<dir>/checkpoints``; a path: its file name) was taken: its updates
        since are lost, so the groups it sampled since must be offered again.

        The state becomes the checkpoint's plus every ``ins``, ``adm`` and ``rel`` record
        logged after it: every group acknowledged since stays (nothing acknowledged is lost)
        and no prompt position handed out since is handed out again, while sample counts,
        uses, stale evictions, the learner's version and the rate limiter's sample count
        are the checkpoint's. Sample answers are dropped (they went to the learner that is
        being replaced). Logged as an ``rwd`` record, which recovery redoes the same way.
        Call it on the serving thread (the ``rewind`` request) or while not serving.
        """
        name = Path(checkpoint).name
        if not ckpt.NAME.fullmatch(name):
            raise WireError(f"rewind: {checkpoint!r} is not a replay checkpoint file name")
        end = self.log.position()
        loaded = ckpt.load(self.checkpoint_dir / name)
        if loaded is None:
            raise WireError(f"rewind: no intact checkpoint {name} in {self.checkpoint_dir}")
        covered = (loaded[0]["segment"], loaded[0]["offset"])
        if covered > end:
            raise WireError(f"rewind: checkpoint {name} is ahead of the log (at {end})")
        try:
            state = rewound(
                self.log, self.checkpoint_dir, self._new_state, name, end, covered, loaded
            )
        except ValueError as e:  # e.g. a group record it refers to is damaged
            raise WireError(f"rewind: cannot restore checkpoint {name}: {e}") from None
        self.log.append(msgpack.packb({"k": "rwd", "c": name, "s": covered[0], "o": covered[1]}))
        state.rewinds = self.state.rewinds | {name}  # kept by prune: recovery may redo it
        self.state = state
        self._changes += 1
        return {"checkpoint": name, "version": self.buffer.version, "size": len(self.buffer)}

    # ---------------------------------------------------------------- handlers
    def handle(self, msg_type: str, msg: dict, identity: bytes = b"") -> tuple[str, dict] | None:
        """One request -> (reply type, fields), or None when it is held: the answer goes to
        ``identity`` later."""
        if msg_type not in REQUESTS:
            raise WireError(f"unknown message type {msg_type!r}")
        return getattr(self, f"_{msg_type}")(msg, identity)

    def _admit(self, msg: dict, identity: bytes) -> tuple[str, dict]:
        actor, k = _int(msg, "actor"), _int(msg, "k")
        if not 0 <= k <= self.cfg.max_admit:
            raise WireError(f"admit: k={_short(repr(k), 40)} must be in [0, {self.cfg.max_admit}]")
        if "version" in msg:
            self._advance_version(_int(msg, "version"))
        weights = _int(msg, "weights") if "weights" in msg else None
        # the reply lists at most max_groups positions
        positions = decisions.admit(self.state, self.cfg, k, weights, self.limits.max_groups)
        if positions:
            self._record({"k": "adm", "a": actor, "p": positions})
        return "admitted", {"n": len(positions), "positions": positions}

    def _version(self, msg: dict, identity: bytes) -> tuple[str, dict]:
        self._advance_version(_int(msg, "version"))  # the learner published
        return "version", {"version": self.buffer.version}

    def _release(self, msg: dict, identity: bytes) -> tuple[str, dict]:
        self._record({"k": "rel", "a": _int(msg, "actor")})  # its unfinished work goes again
        return "released", {}

    def _checkpoint(self, msg: dict, identity: bytes) -> tuple[str, dict]:
        try:
            tag = ckpt.check_tag(msg.get("tag", ""))
        except ValueError as e:
            raise WireError(str(e)) from None
        header = self.checkpoint(tag=tag)
        return "checkpointed", {k: header[k] for k in ("path", "segment", "offset")}

    def _prune(self, msg: dict, identity: bytes) -> tuple[str, dict]:
        names = msg.get("keep")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise WireError("prune needs 'keep': a list of checkpoint file names")
        keep = {Path(n).name for n in names} | self.state.rewinds  # rwd records need theirs
        gone = [p.name for p in ckpt.prune(self.checkpoint_dir, keep)]
        if self.cfg.retain == "needed":  # fewer checkpoints may need less of the log
            self.retire_segments()
        cap = max_array_len(self.limits)  # the reply names at most this many
        more = {"more": len(gone) - cap} if len(gone) > cap else {}  # deleted, unnamed
        return "pruned", {"deleted": gone[:cap], **more}

    def _rewind(self, msg: dict, identity: bytes) -> tuple[str, dict]:
        checkpoint = msg.get("checkpoint")
        if not isinstance(checkpoint, str):
            raise WireError("rewind needs the name of a replay checkpoint 'checkpoint'")
        return "rewound", self.rewind(checkpoint)

    def _stats(self, msg: dict, identity: bytes) -> tuple[str, dict]:
        return "stats", self.stats()

    def _insert(self, msg: dict, identity: bytes) -> tuple[str, dict] | None:
        obj = msg.get("group")
        info = check_group(obj, self.limits)
        timeout_ms = _int(msg, "timeout_ms", self.cfg.insert_timeout_ms)
        if self._seen(info.group_id):
            self.buffer.counters.duplicates += 1
            return "ack", {"group_id": info.group_id, "duplicate": True}
        raw = msgpack.packb(obj, use_bin_type=True)  # the validated map, encoded once
        self._check_insert(info, len(raw))
        if self._must_hold():
            self._hold_insert(info, obj, raw, timeout_ms, (identity, msg.get("rid")))
            return None
        self._inserts([(info, obj, raw)])
        return "ack", {"group_id": info.group_id, "duplicate": False}

    def _insert_batch(self, msg: dict, identity: bytes) -> tuple[str, dict] | None:
        items = msg.get("groups")
        if not isinstance(items, list) or not items:
            raise WireError("insert_batch needs a non-empty list 'groups'")
        if len(items) > self.limits.max_groups:
            raise WireError(f"{len(items)} groups exceed the limit of {self.limits.max_groups}")
        timeout_ms = _int(msg, "timeout_ms", self.cfg.insert_timeout_ms)
        batch = BatchReply(identity, msg.get("rid"), [None] * len(items))
        try:
            return self._insert_batch_groups(items, timeout_ms, batch)
        except Exception:  # answered with an error: groups it left held must not answer too
            batch.abandoned = True
            raise

    def _insert_batch_groups(
        self, items: list, timeout_ms: int, batch: BatchReply
    ) -> tuple[str, dict] | None:
        results, accepted, ids = batch.results, [], set()
        pending: dict[str, int] = {}  # producer -> its highest seq accepted in this message
        for i, raw in enumerate(items):
            try:
                obj, info = unpack_group(raw, self.limits)  # full validation, once
                self._check_insert(info, len(raw))
            except WireError as e:
                self._reject("bad_group")
                results[i] = [REJECTED, _short(str(e), MAX_GROUP_REASON)]
                continue
            gid = info.group_id
            try:
                seen = self._seen(gid, pending) or gid in ids
            except WireError as e:
                self._reject("bad_group")
                results[i] = [REJECTED, _short(str(e), MAX_GROUP_REASON)]
                continue
            if seen:
                self.buffer.counters.duplicates += 1
                results[i] = [DUPLICATE, ""]
                continue
            ids.add(gid)
            if (split := split_id(gid)) is not None:
                pending[split[0]] = max(pending.get(split[0], -1), split[1])
            if self._must_hold():
                self._hold_insert(info, obj, raw, timeout_ms, (batch, i))
                batch.pending += 1
                continue
            if self.state.limiter is not None:  # each insert moves the limiter: one by one
                self._inserts([(info, obj, raw)])
            else:
                accepted.append((info, obj, raw))
            results[i] = [ACCEPTED, ""]
        if accepted:
            self._inserts(accepted)  # one append (and flush, fsync policy) for the message
        return None if batch.pending else ("acks", {"results": results})

    def _seen(self, group_id: str, pending: dict | None = None) -> bool:
        """Whether the group was accepted before; WireError when that can no longer be
        told (its producer's seq is below its window: replay/dedup.py). ``pending``: what
        the same message accepted before it (Dedup.status)."""
        status = self.buffer.seen.status(group_id, pending)
        if status == EXPIRED:
            self.dedup_expired += 1
            raise WireError(f"group {_short(group_id, 60)}: too old to tell from a retry "
                            f"(more than {self.buffer.seen.window} groups of its producer "
                            "since): refused")  # fmt: skip
        return status == SEEN

    def _check_insert(self, info: GroupInfo, size: int) -> None:
        """What a validated group must also meet here: a version no further ahead than a
        version message may move (a fresh service takes its first group's as it comes:
        a preload of a stored run), and a size a batch reply can carry."""
        fresh = self.buffer.counters.inserted == 0 and self.buffer.version == 0
        top = MAX_VERSION if fresh else min(MAX_VERSION, self._version_ceiling())
        if info.min_version > top:
            raise WireError(f"group versions from {info.min_version} refused: more than "
                            f"{self.cfg.max_version_jump} ahead of the service's")  # fmt: skip
        if size > self._reply_room():
            raise WireError(f"a group of {size} bytes could never be sampled (a reply holds "
                            f"{self._reply_room()})")  # fmt: skip

    def _reply_room(self) -> int:
        """Bytes of groups a batch reply may carry: the message limit less room for the
        envelope and per-group info."""
        return self.limits.max_message_bytes - min(
            REPLY_HEADROOM, self.limits.max_message_bytes // 8
        )

    def _version_ceiling(self) -> int:
        return max(self.buffer.version, self.buffer.newest_version) + self.cfg.max_version_jump

    def _must_hold(self) -> bool:
        """Inserts wait behind held ones (arrival order) and while the limiter says so,
        unless sampling is starved (``_may_insert``)."""
        limiter = self.state.limiter
        return limiter is not None and (bool(self.held.inserts) or not self._may_insert())

    def _may_insert(self) -> bool:
        """The limiter allows an insert, or a sample the limiter allows found too few
        groups the selector may pick (mixed: fresh ones): holding inserts then would hold
        both sides forever, so inserts go until a sample is served."""
        return decisions.may_insert(self.state, self.starved)

    def _hold_insert(self, info: GroupInfo, obj: dict, raw: bytes, timeout_ms: int, waiter) -> None:
        old = self.held.take_insert_waiter(info.group_id, waiter)
        if old is None:
            if len(self.held.inserts) >= self.cfg.max_held:  # bounded memory and scan time
                raise WireError(f"{len(self.held.inserts)} inserts already wait for the rate "
                                "limiter: try again later")  # fmt: skip
            self.held.hold_insert(info, obj, raw, timeout_ms, waiter)
        elif isinstance(old[0], BatchReply):  # so that the rest of its batch is answered
            self._answer_slot(old[0], old[1], TIMEOUT, SUPERSEDED)

    def _resolve(self, held: HeldInsert, status: str, reason: str = "") -> None:
        """Answer a held insert's waiter: its ack (or error), or its slot of a batch."""
        target, slot = held.waiter
        if isinstance(target, BatchReply):
            self._answer_slot(target, slot, status, reason)
        elif status == TIMEOUT:
            self._send(target, "error", slot, reason=reason, code="insert_timeout")
        elif status == REJECTED:
            self._send(target, "error", slot, reason=reason)
        else:
            gid = held.info.group_id
            self._send(target, "ack", slot, group_id=gid, duplicate=status == DUPLICATE)

    def _answer_slot(self, batch: BatchReply, slot: int, status: str, reason: str) -> None:
        batch.results[slot] = [status, reason]
        batch.pending -= 1
        if batch.pending == 0 and not batch.abandoned:
            self._send(batch.identity, "acks", batch.rid, results=batch.results)

    def _advance_version(self, version: int) -> None:
        top = min(MAX_VERSION, self._version_ceiling())
        if not 0 <= version <= top:
            raise WireError(
                f"version {_short(repr(version), 40)} refused: a version may rise at most "
                f"{self.cfg.max_version_jump} above the current one ({self.buffer.version}) or "
                f"the newest group's ({self.buffer.newest_version})"
            )
        if version > self.buffer.version:
            self._record({"k": "ver", "v": version})

    def _sample(self, msg: dict, identity: bytes = b"") -> tuple[str, dict] | None:
        batch_size, version = _int(msg, "batch_size"), _int(msg, "version")
        timeout_ms = _int(msg, "timeout_ms", 0)
        req = msg.get("req")
        if not 1 <= batch_size <= self.limits.max_groups:  # a reply holds at most max_groups
            raise WireError(f"batch_size must be in [1, {self.limits.max_groups}]")
        if not isinstance(req, str) or not req:
            raise WireError("sample needs a request id 'req'")
        if self.state.limiter is not None:
            try:
                self.state.limiter.check_batch(batch_size)
            except ValueError as e:
                raise WireError(str(e)) from None
        if req in self.state.answers:  # a retry: the same answer again, never a second batch
            self.held.samples.pop(req, None)
            return self._batch_reply(req)
        starved = self.starved
        reply = self._try_sample(batch_size, version, req)
        if reply is not None:
            self.held.samples.pop(req, None)  # a retry answered now: its held twin goes
        else:
            self.starved = starved  # only held samples decide it (_serve_held_samples)
            retry = req in self.held.samples
            if not retry and len(self.held.samples) >= self.cfg.max_held:  # bounded
                return "empty", {}
            self.held.hold_sample(Held(identity, msg, time.monotonic() + timeout_ms / 1000.0))
            self._tried_at = -1  # a new one: try the held samples at the next turn
        return reply

    def _try_sample(self, batch_size: int, version: int, req: str) -> tuple[str, dict] | None:
        self._advance_version(version)
        ids, starved = decisions.select(self.state, batch_size)
        if starved is not None:  # the limiter allowed it: starved if the groups are missing
            self.starved = starved
        if ids is None:
            return None
        size = sum(len(self.buffer.entries[i].payload) for i in ids)
        if size > self._reply_room():  # refused before logged
            raise WireError(
                f"a batch of these {batch_size} groups is {size} bytes, more than a reply "
                f"may hold ({self.limits.max_message_bytes}): sample fewer groups a request"
            )
        # the record keeps the answer (state.answers), for retries, after a restart too
        self._record({"k": "smp", "ids": ids, "v": self.buffer.version, "req": req})
        self.metrics.sampled([staleness for _, staleness, _ in self.state.answers[req][1]])
        return self._batch_reply(req)

    def _batch_reply(self, req: str) -> tuple[str, dict]:
        payloads, info, _ = self.state.answers[req]
        return "batch", {"groups": Packed(payloads), "info": info}  # stored bytes, as they are

    def stats(self) -> dict:
        out = {
            "size": len(self.buffer),
            "version": self.buffer.version,
            "rejected": self.rejected,
            "internal_errors": self.internal_errors,
            "log_sync_errors": self.log.sync_errors,
            "log_write_errors": self.log.write_errors,
            "log_failed": self.log.failed is not None,
            "insert_timeouts": self.insert_timeouts,
            "held_bytes": self.buffer.held_bytes,
            "log_bytes": sum(p.stat().st_size for p in self.log.segments()),
            "dedup_entries": len(self.buffer.seen),
            "dedup_producers": len(self.buffer.seen.producers),
            "dedup_legacy_ids": len(self.buffer.seen.legacy),
            "dedup_expired": self.dedup_expired,
            "retired_segments": self.retired_segments,
            "held_inserts": len(self.held.inserts),
            "held_samples": len(self.held.samples),
            "in_flight": self.state.in_flight,
            "cursor": self.state.cursor,
            **asdict(self.buffer.counters),
            "recovered_records": self.recovery.records,
            "recovery_corrupt_skipped": self.recovery.corrupt_skipped,
            "recovery_torn_bytes": self.recovery.torn_bytes_truncated,
            "recovery_lost_records": self.recovery.lost_records,
            "recovered_checkpoint": self.recovered_checkpoint,
            "recovery_rewind_errors": self.rewind_errors,
        }
        out.update(self.metrics.as_dict(time.monotonic()))
        if (lim := self.state.limiter) is not None:
            out.update(limiter_inserts=lim.inserts, limiter_samples=lim.samples)
            out.update(limiter_diff=lim.diff, limiter_min_diff=lim.min_diff)
            out.update(limiter_max_diff=lim.max_diff)
        return out

    # ---------------------------------------------------------------- socket loop
    def bind(self) -> str:
        try:
            return self._bind()
        except BaseException:  # a server that cannot serve lets go of its directory
            self.log.close()
            raise

    def _bind(self) -> str:
        host = self.cfg.address.removeprefix("tcp://").rsplit(":", 1)[0]
        if self.curve is None and not self.cfg.insecure and not _loopback(host):
            raise ValueError(
                f"the replay service would listen on {self.cfg.address} without encryption or "
                "authentication: any peer reaching it could insert made-up groups or drain, "
                "rewind and prune the buffer. Give it CURVE keys (replay.curve_secret_key; "
                "python -m flowrl_async.replay.curve DIR NAME) or set replay.insecure=true"
            )
        ctx = zmq.Context.instance()
        if self.curve is not None:  # a context of its own: it holds this server's ZAP handler
            ctx = self._ctx = zmq.Context()
            self._auth, self._keys = self.curve.start_authenticator(ctx)
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # zmq drops a peer whose frame is more than twice the limit, before buffering it
        # (the decoder's limit alone let a 1 GiB frame be received whole first); one up to
        # twice the limit is still received and answered with an error
        self._sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.limits.max_message_bytes)
        if self.curve is not None:
            self.curve.apply(self._sock)
        if self.cfg.address.endswith(":0"):
            host = self.cfg.address.rsplit(":", 1)[0]
            self.bound_address = f"{host}:{self._sock.bind_to_random_port(host)}"
        else:
            self._sock.bind(self.cfg.address)
            self.bound_address = self.cfg.address
        return self.bound_address

    def serve(self) -> None:
        """Bind (unless ``bind`` was called) and answer requests until ``stop``."""
        if self._sock is None:
            self.bind()
        sock = self._sock
        freeze_survivors()  # what recovery loaded stays: out of the collector's way
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                self.metrics.mark(time.monotonic())
                wait_ms = 100  # the log fsyncs on its own thread ("interval") or at once
                if self.held:
                    wait_ms = min(wait_ms, 10)
                if dict(poller.poll(wait_ms)).get(sock):
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=self._keys is None)
                        except zmq.Again:
                            break
                        if self._keys is None:
                            self._on_frames(frames)
                        else:  # the sender's role, from its key (the ZAP User-Id)
                            self._on_frames([f.bytes for f in frames], self._role(frames))
                try:
                    self._serve_held()
                except Exception:  # e.g. a full disk: count it, keep serving (retries are safe)
                    self.internal_errors += 1
                    traceback.print_exc(file=sys.stderr)
                if self.log.failed is not None:  # nothing can be acknowledged any more:
                    break  # stop, so that a restart recovers what the disk holds
                try:
                    self.maybe_checkpoint()
                except Exception:  # e.g. a full disk: counted; the log still holds it all
                    self.internal_errors += 1
                    traceback.print_exc(file=sys.stderr)
        finally:
            self.log.close()
            sock.close(0)
            self._sock = None
            if self._auth is not None:
                self._auth.stop()
            if self._ctx is not None:
                self._ctx.term()
            self._auth = self._ctx = self._keys = None

    def _send(self, identity: bytes, kind: str, rid, **fields) -> None:
        data = encode(kind, rid=_safe_rid(rid), **fields)
        # a large reply (a sampled batch) goes without a copy into zmq
        self._sock.send_multipart([identity, data], copy=len(data) < ZERO_COPY_BYTES)

    def _reject(self, reason: str) -> None:
        self.rejected += 1
        self.metrics.rejected(reason)

    def _role(self, frames) -> str | None:
        """The sender's role; None (refused) without a User-Id or when the key directory
        cannot be read."""
        try:
            return self._keys.role(frames[-1].get("User-Id").encode(), RECHECK_S)
        except Exception:
            self.internal_errors += 1
            traceback.print_exc(file=sys.stderr)
            return None

    def _on_frames(self, frames: list[bytes], role: str | None = ANY) -> None:
        if len(frames) < 2:  # a ROUTER always prepends the identity; nobody to answer
            self._reject("frames")
            return
        identity, rid, stage = frames[0], None, "frames"
        try:
            if len(frames) > 2:
                raise WireError(f"expected one message frame, got {len(frames) - 1}")
            stage = "undecodable"
            msg_type, msg = decode(frames[1], self.limits)
            rid = msg.get("rid")
            stage = f"bad_{msg_type}" if msg_type in REQUESTS else "unknown_type"
            if not allowed(role, msg_type, msg):
                stage = "forbidden"
                raise WireError(f"{msg_type!r} is not allowed for this client's key "
                                f"({role or 'no longer authorized'})")  # fmt: skip
            reply = self.handle(msg_type, msg, identity)
            if reply is not None:  # None: held, answered later
                self._send(identity, reply[0], rid, **reply[1])
        except WireError as e:
            self._reject(stage)
            self._send(identity, "error", rid, reason=_short(str(e)))
        except Exception as e:  # a bug, not bad input: answer, count, keep serving
            self.internal_errors += 1
            traceback.print_exc(file=sys.stderr)
            reason = _short(f"internal error: {type(e).__name__}: {e}")
            self._send(identity, "error", rid, reason=reason)

    def _serve_held(self) -> None:
        """Answer what can go now (inserts first, in order; samples free inserts, so repeat),
        then time out the rest. While a held sample the limiter allows finds too few groups
        for its selector (``starved``), held inserts go one at a time past the limiter, each
        followed by another try of the samples, so only what they need gets in."""
        if not self.held:
            return
        progress = True
        while progress:
            progress = False
            while self.held.inserts and self._may_insert():
                bypass = not self.state.limiter.can_insert(len(self.buffer))
                gid, held = self.held.inserts.popitem(last=False)
                status = self.buffer.seen.status(gid)  # new when held; may have expired since
                if status != NEW:
                    if status == EXPIRED:
                        self.dedup_expired += 1
                        self._reject("bad_group")
                    self._resolve(held, DUPLICATE if status == SEEN else REJECTED,
                                  "" if status == SEEN else "too old to tell from a retry")  # fmt: skip
                    continue
                self._inserts([(held.info, held.obj, held.raw)])
                self._resolve(held, ACCEPTED)
                self.metrics.waited("insert", time.monotonic() - held.since)
                if bypass:  # let the starved samples try with it first
                    break
            progress = self._serve_held_samples() or (self.starved and bool(self.held.inserts))
        now = time.monotonic()
        for held in self.held.expired_inserts(now):
            self.insert_timeouts += 1
            reason = self.state.limiter.why_insert_waits(len(self.buffer))
            self._resolve(held, TIMEOUT, f"{reason}; held {held.timeout_ms} ms")
            self.metrics.waited("insert", now - held.since)
        for held in self.held.expired_samples(now):
            self._send(held.identity, "empty", held.msg.get("rid"))
            self.metrics.waited("sample", now - held.since)
        self.starved = self.starved and bool(self.held.samples)  # nobody waits: no bypass

    def _serve_held_samples(self) -> bool:
        """Try every held sample once, unless none came and the state did not change since
        the last try (nothing could be answered now); each answered one leaves the list at
        once (an exception part way must not answer it twice). -> whether any was answered."""
        if self._tried_at == self._changes:
            return False
        self._tried_at = self._changes
        try:
            return self._try_held_samples()
        except BaseException:
            self._tried_at = -1  # not all were tried: every one again at the next turn
            raise

    def _try_held_samples(self) -> bool:
        served, starved = False, False
        for held in list(self.held.samples.values()):
            m = held.msg
            try:
                reply = self._try_sample(m["batch_size"], m["version"], m["req"])
            except WireError as e:  # e.g. the batch would not fit a reply: answered
                del self.held.samples[m["req"]]
                self._reject("bad_sample")
                self._send(held.identity, "error", m.get("rid"), reason=_short(str(e)))
                continue
            if reply is None:
                starved = starved or self.starved
                continue
            del self.held.samples[m["req"]]
            self._send(held.identity, reply[0], m.get("rid"), **reply[1])
            self.metrics.waited("sample", time.monotonic() - held.since)
            served = self.state.limiter is not None
        self.starved = starved  # some held sample the limiter allows lacks groups
        return served

    def stop(self) -> None:
        self._stop.set()


def _loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost", "ipc", "inproc") or not host:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: resolvable to anything
        return False


def _int(msg: dict, key: str, default: int | None = None) -> int:
    value = msg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(f"field {key!r} must be an integer, got {value!r}")
    return value


MAX_REASON = 2000  # characters of an error reply's reason (it may quote the request)


MAX_GROUP_REASON = 300  # per rejected group of an insert_batch (up to max_groups of them)


def _short(reason: str, limit: int = MAX_REASON) -> str:
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def _safe_rid(rid):
    return rid if isinstance(rid, int | str) and not isinstance(rid, bool) else None


def main(argv: list[str] | None = None) -> None:
    server = ReplayServer(parse_args(argv, __doc__.splitlines()[0]))
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    address = server.bind()
    print(f"replay server on {address}, recovered {server.recovery}", flush=True)
    server.serve()
    if server.log.failed is not None:
        sys.exit(f"replay server stopped: its log failed ({server.log.failed!r})")


if __name__ == "__main__":
    main()
