"""The replay client: the only way actors and the learner talk to the replay service.

Invariants: ``insert`` and ``insert_many`` return only once the server has acknowledged
every group (it is in the log); on a timeout they resend the same groups, which the server
deduplicates by id, so the effect is exactly once. ``insert_many`` keeps at most ``window``
inserts unacknowledged. A reply that does not answer the current request (a late
answer to an earlier try) is ignored. Server-side errors raise ``ReplayError``.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import zmq

from flowrl_async.records import Group
from flowrl_async.wire import WireLimits, decode, encode, group_from_wire, group_to_wire


class ReplayError(RuntimeError):
    """The replay service rejected a request, or did not answer in time."""


class InsertTimeout(ReplayError):
    """The rate limiter held an insert past its timeout; inserting it again is safe."""


def _rejected(msg_type: str, msg: dict) -> ReplayError:
    cls = InsertTimeout if msg.get("code") == "insert_timeout" else ReplayError
    return cls(f"replay service rejected {msg_type}: {msg.get('reason')}")


@dataclass(frozen=True)
class SampleInfo:
    times_sampled: int
    staleness: int
    inserted_at: float


class ReplayClient:
    def __init__(
        self,
        address: str,
        request_timeout_s: float = 5.0,
        max_retries: int = 60,
        limits: WireLimits = WireLimits(),
    ):
        self.address, self.timeout, self.max_retries = address, request_timeout_s, max_retries
        self.limits = limits
        self._rids = itertools.count(1)
        self._ctx = zmq.Context.instance()
        self._sock = None
        self._connect()

    def _connect(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.address)

    def request(self, msg_type: str, timeout_s: float | None = None, **fields) -> tuple[str, dict]:
        """Send until answered (resending after each timeout); -> (reply type, fields)."""
        rid = next(self._rids)
        payload = encode(msg_type, rid=rid, **fields)
        timeout = self.timeout if timeout_s is None else timeout_s
        for _ in range(self.max_retries):
            self._sock.send(payload)
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                if not self._sock.poll(int(left * 1000) + 1):
                    break
                kind, msg = decode(self._sock.recv(), self.limits)
                if msg.get("rid") != rid:
                    continue  # a late answer to an earlier request
                if kind == "error":
                    raise _rejected(msg_type, msg)
                return kind, msg
            self._connect()  # a fresh socket drops anything queued for a dead peer
        raise ReplayError(
            f"no answer to {msg_type} from {self.address} after {self.max_retries} tries"
        )

    def insert(self, group: Group, timeout_s: float | None = None) -> bool:
        """Insert until acknowledged; -> False when the server already had this group.

        ``timeout_s``: the longest the server may hold it for its rate limiter (None: the
        server's default); past it the server answers an error and this raises ReplayError,
        after which inserting the same group again is safe (deduplicated by id).
        """
        if timeout_s is None:
            _, msg = self.request("insert", group=group_to_wire(group))
        else:
            _, msg = self.request(
                "insert",
                timeout_s=timeout_s + self.timeout,
                group=group_to_wire(group),
                timeout_ms=int(timeout_s * 1000),
            )
        return not msg["duplicate"]

    def insert_many(self, groups: Sequence[Group], window: int = 64) -> list[bool]:
        """Insert all, keeping up to ``window`` unacknowledged; -> per group, True when new.

        Returns once every group is acknowledged. When no answer comes for a request timeout,
        every unacknowledged insert is resent on a fresh socket (safe: the server
        deduplicates by group id). An error reply raises ReplayError; inserts already sent may
        still land, and calling again with the same groups is safe.
        """
        if window < 1:
            raise ValueError("window must be >= 1")
        result: list[bool | None] = [None] * len(groups)
        todo = deque(range(len(groups)))
        sent: dict[int, int] = {}  # rid -> index into groups
        tries = 0
        while todo or sent:
            while todo and len(sent) < window:
                i, rid = todo.popleft(), next(self._rids)
                self._sock.send(encode("insert", rid=rid, group=group_to_wire(groups[i])))
                sent[rid] = i
            if not self._sock.poll(int(self.timeout * 1000) + 1):
                tries += 1
                if tries >= self.max_retries:
                    raise ReplayError(
                        f"no answer to {len(sent)} inserts from {self.address} "
                        f"after {self.max_retries} tries"
                    )
                todo.extendleft(sorted(sent.values(), reverse=True))
                sent.clear()
                self._connect()
                continue
            kind, msg = decode(self._sock.recv(), self.limits)
            i = sent.pop(msg.get("rid"), None)
            if i is None:
                continue  # a late answer to an earlier try
            if kind == "error":
                raise _rejected("insert", msg)
            result[i], tries = not msg["duplicate"], 0
        return result  # type: ignore[return-value]

    def admit(
        self, actor_id: int, k: int, version: int | None = None, weights: int | None = None
    ) -> list[int]:
        """Ask to start up to k groups; -> the prompt-stream positions granted (maybe none)."""
        fields = {"actor": actor_id, "k": k}
        if version is not None:
            fields["version"] = version
        if weights is not None:  # the actor's weight version: refused if already too stale
            fields["weights"] = weights
        return list(self.request("admit", **fields)[1]["positions"])

    def set_version(self, version: int) -> int:
        """Tell the service the learner's weight version (after each publication)."""
        return self.request("version", version=version)[1]["version"]

    def release(self, actor_id: int) -> None:
        self.request("release", actor=actor_id)

    def sample(
        self, batch_size: int, version: int, timeout_s: float = 1.0
    ) -> list[tuple[Group, SampleInfo]] | None:
        """``batch_size`` whole groups, or None when the service had too few within timeout_s."""
        kind, msg = self.request(
            "sample",
            timeout_s=timeout_s + self.timeout,
            batch_size=batch_size,
            version=version,
            timeout_ms=int(timeout_s * 1000),
            req=uuid.uuid4().hex,  # retries reuse it: the server answers each id once
        )
        if kind == "empty":
            return None
        return [
            (group_from_wire(g, self.limits), SampleInfo(*info))
            for g, info in zip(msg["groups"], msg["info"], strict=True)
        ]

    def checkpoint(self, tag: str = "") -> dict:
        """Ask for a replay checkpoint now (e.g. with the learner's step as ``tag``);
        -> {path, segment, offset}. Recovery starts from the newest one."""
        _, msg = self.request("checkpoint", tag=tag)
        return {k: msg[k] for k in ("path", "segment", "offset")}

    def stats(self) -> dict:
        return {k: v for k, v in self.request("stats")[1].items() if k not in ("v", "t", "rid")}

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
