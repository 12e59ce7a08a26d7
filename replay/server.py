"""The replay service: one process owning the buffer, serving actors and the learner over zmq.

Protocol (flowrl_async.wire messages over a ROUTER socket; every request carries ``rid`` and
its reply echoes it):
  insert {group}                    -> ack {group_id, duplicate}      (after the log append)
  admit  {actor, k, version?}       -> admitted {n}
  sample {batch_size, version, timeout_ms} -> batch {groups, info} | empty {}  (parked until
                                       enough groups or the timeout)
  stats  {}                         -> stats {...}
  anything malformed                -> error {reason}                 (counted; nothing else
                                       changes)

Invariants: an insert is acknowledged only after its record is in the log; the log also
records every sample, so after a restart the buffer holds exactly the acknowledged groups
that were not yet used up, with their sample counts. The server never dies on bad input.

Run: python -m flowrl_async.replay.server --dir RUN_DIR/replay --address tcp://127.0.0.1:5555
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from dataclasses import asdict, dataclass

import msgpack
import zmq

from flowrl_async.replay.buffer import Entry, ReplayBuffer
from flowrl_async.replay.log import RecoveryReport, SegmentLog
from flowrl_async.wire import WireError, WireLimits, decode, encode, group_from_wire


@dataclass
class ServerConfig:
    directory: str
    address: str = "tcp://127.0.0.1:5555"
    capacity: int = 10_000
    max_staleness: int | None = 1
    selector: str = "fifo"
    max_times_sampled: int = 1
    groups_per_version: int = 8  # learner batch size × publish interval, for admission
    fsync: str = "interval"
    fsync_interval_ms: float = 10.0
    segment_bytes: int = 64 * 1024 * 1024
    seed: int = 0


def reward_spread(group_obj: dict) -> float:
    rewards = [r["r"] for r in group_obj["responses"]]
    return max(rewards) - min(rewards)


class ReplayServer:
    def __init__(self, cfg: ServerConfig, limits: WireLimits = WireLimits()):
        self.cfg, self.limits = cfg, limits
        self.buffer = ReplayBuffer(
            cfg.capacity, cfg.max_staleness, cfg.selector, cfg.max_times_sampled, cfg.seed
        )
        self.log = SegmentLog(cfg.directory, cfg.segment_bytes, cfg.fsync, cfg.fsync_interval_ms)
        self.outstanding: dict[int, set[int]] = {}  # actor -> positions granted, not yet in
        self.redo: list[int] = []  # positions of restarted actors, handed out first
        self.cursor = 0  # the next new position in the prompt stream
        self.rejected = 0
        self.recovery = self._recover()
        self._stop = threading.Event()
        self._pending: list[tuple[bytes, dict, float]] = []  # parked sample requests
        self._answered: dict[str, tuple[str, dict]] = {}  # recent sample replies by request id
        self.bound_address: str | None = None

    # ---------------------------------------------------------------- state and recovery
    # Every state change is a log record applied by ``_apply``, live and during recovery:
    #   ins {g}: a group; adm {a, p}: positions granted to actor a; rel {a}: actor a restarted;
    #   smp {ids, v}: groups handed to the learner at version v.
    def _record(self, record: dict) -> None:
        self.log.append(msgpack.packb(record, use_bin_type=True))
        self._apply(record)

    def _apply(self, record: dict, group=None) -> None:
        kind = record["k"]
        if kind == "ins":
            obj = record["g"]
            group = group or group_from_wire(obj, self.limits)
            entry = Entry(group.group_id, group.min_version, obj, priority=reward_spread(obj))
            if self.buffer.insert(entry):
                self.outstanding.get(group.actor_id, set()).discard(group.cursor)
        elif kind == "adm":
            positions = record["p"]
            self.outstanding.setdefault(record["a"], set()).update(positions)
            self.redo = [p for p in self.redo if p not in set(positions)]
            self.cursor = max([self.cursor, *(p + 1 for p in positions)])
        elif kind == "rel":
            self.redo = sorted(set(self.redo) | self.outstanding.pop(record["a"], set()))
        elif kind == "smp":
            self.buffer.evict_stale(record["v"])
            for gid in record["ids"]:
                e = self.buffer.entries.get(gid)
                if e is None:
                    continue
                e.times_sampled += 1
                self.buffer.counters.sampled_groups += 1
                if e.times_sampled >= self.buffer.max_times_sampled:
                    del self.buffer.entries[gid]
                    self.buffer.counters.evicted_used += 1
        else:
            raise KeyError(kind)

    def _recover(self) -> RecoveryReport:
        report = RecoveryReport()
        for payload in self.log.read_all(report):
            try:
                self._apply(msgpack.unpackb(payload, raw=False))
            except (WireError, KeyError, TypeError, ValueError):
                report.corrupt_skipped += 1
        return report

    @property
    def in_flight(self) -> int:
        return sum(len(p) for p in self.outstanding.values())

    # ---------------------------------------------------------------- handlers
    def handle(self, msg_type: str, msg: dict) -> tuple[str, dict] | None:
        """One request -> (reply type, fields), or None when parked."""
        if msg_type == "insert":
            obj = msg.get("group")
            group = group_from_wire(obj, self.limits)
            duplicate = group.group_id in self.buffer.seen
            if duplicate:
                self.buffer.counters.duplicates += 1
            else:
                self.log.append(msgpack.packb({"k": "ins", "g": obj}, use_bin_type=True))
                self._apply({"k": "ins", "g": obj}, group)
            return "ack", {"group_id": group.group_id, "duplicate": duplicate}
        if msg_type == "admit":
            actor, k = _int(msg, "actor"), _int(msg, "k")
            if "version" in msg:
                self.buffer.evict_stale(_int(msg, "version"))
            free = self.buffer.admission_capacity(
                self.buffer.version, self.cfg.groups_per_version, self.in_flight
            )
            n = max(0, min(k, free))
            positions = self.redo[:n] + list(
                range(self.cursor, self.cursor + n - len(self.redo[:n]))
            )
            if positions:
                self._record({"k": "adm", "a": actor, "p": positions})
            return "admitted", {"n": n, "positions": positions}
        if msg_type == "release":  # an actor restarted: its unfinished work is handed out again
            self._record({"k": "rel", "a": _int(msg, "actor")})
            return "released", {}
        if msg_type == "sample":
            return self._try_sample(msg)
        if msg_type == "stats":
            return "stats", self.stats()
        raise WireError(f"unknown message type {msg_type!r}")

    def _try_sample(self, msg: dict) -> tuple[str, dict] | None:
        batch_size, version = _int(msg, "batch_size"), _int(msg, "version")
        req = msg.get("req")
        if batch_size < 1:
            raise WireError("batch_size must be >= 1")
        if not isinstance(req, str) or not req:
            raise WireError("sample needs a request id 'req'")
        if req in self._answered:  # a retry: the same answer again, never a second batch
            return self._answered[req]
        picked = self.buffer.sample(batch_size, version)
        if picked is None:
            return None
        ids = [e.group_id for e, _ in picked]
        self.log.append(msgpack.packb({"k": "smp", "ids": ids, "v": version}, use_bin_type=True))
        # the buffer already counted these samples in buffer.sample
        reply = (
            "batch",
            {
                "groups": [e.payload for e, _ in picked],
                "info": [[e.times_sampled, s, e.inserted_at] for e, s in picked],
            },
        )
        self._answered[req] = reply
        while len(self._answered) > 16:
            self._answered.pop(next(iter(self._answered)))
        return reply

    def stats(self) -> dict:
        return {
            "size": len(self.buffer),
            "version": self.buffer.version,
            "rejected": self.rejected,
            "in_flight": self.in_flight,
            "cursor": self.cursor,
            **asdict(self.buffer.counters),
            "recovered_records": self.recovery.records,
            "recovery_corrupt_skipped": self.recovery.corrupt_skipped,
            "recovery_torn_bytes": self.recovery.torn_bytes_truncated,
        }

    # ---------------------------------------------------------------- socket loop
    def serve(self) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.cfg.address.endswith(":0"):
            port = sock.bind_to_random_port(self.cfg.address.rsplit(":", 1)[0])
            self.bound_address = f"{self.cfg.address.rsplit(':', 1)[0]}:{port}"
        else:
            sock.bind(self.cfg.address)
            self.bound_address = self.cfg.address
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                wait_ms = max(1, int(self.log.fsync_interval * 1000)) if self.log._dirty else 100
                if dict(poller.poll(wait_ms)).get(sock):
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_frames(sock, frames)
                self.log.maybe_sync()
                self._serve_parked(sock)
        finally:
            self.log.close()
            sock.close(0)

    def _on_frames(self, sock, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.rejected += 1
            return
        identity, data = frames
        rid = None
        try:
            msg_type, msg = decode(data, self.limits)
            rid = msg.get("rid")
            reply = self.handle(msg_type, msg)
            if reply is None:
                # a retry of a request already parked replaces it (new socket identity)
                self._pending = [p for p in self._pending if p[1].get("req") != msg.get("req")]
                deadline = time.monotonic() + _int(msg, "timeout_ms", 0) / 1000.0
                self._pending.append((identity, msg, deadline))
                return
            sock.send_multipart([identity, encode(reply[0], rid=rid, **reply[1])])
        except WireError as e:
            self.rejected += 1
            sock.send_multipart([identity, encode("error", rid=_safe_rid(rid), reason=str(e))])

    def _serve_parked(self, sock) -> None:
        if not self._pending:
            return
        now, still = time.monotonic(), []
        for identity, msg, deadline in self._pending:
            reply = self._try_sample(msg)
            if reply is None and now < deadline:
                still.append((identity, msg, deadline))
                continue
            kind, fields = reply if reply is not None else ("empty", {})
            sock.send_multipart([identity, encode(kind, rid=msg.get("rid"), **fields)])
        self._pending = still

    def stop(self) -> None:
        self._stop.set()


def _int(msg: dict, key: str, default: int | None = None) -> int:
    value = msg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(f"field {key!r} must be an integer, got {value!r}")
    return value


def _safe_rid(rid):
    return rid if isinstance(rid, int | str) and not isinstance(rid, bool) else None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True)
    p.add_argument("--address", default="tcp://127.0.0.1:5555")
    p.add_argument("--capacity", type=int, default=10_000)
    p.add_argument("--max-staleness", type=int, default=1, help="-1 for no bound")
    p.add_argument("--selector", default="fifo")
    p.add_argument("--max-times-sampled", type=int, default=1)
    p.add_argument("--groups-per-version", type=int, default=8)
    p.add_argument("--fsync", default="interval")
    p.add_argument("--fsync-interval-ms", type=float, default=10.0)
    a = p.parse_args(argv)
    server = ReplayServer(
        ServerConfig(
            a.dir,
            a.address,
            a.capacity,
            None if a.max_staleness < 0 else a.max_staleness,
            a.selector,
            a.max_times_sampled,
            a.groups_per_version,
            a.fsync,
            a.fsync_interval_ms,
        )
    )
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    print(f"replay server on {server.cfg.address}, recovered {server.recovery}", flush=True)
    server.serve()


if __name__ == "__main__":
    main()
