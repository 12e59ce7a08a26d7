"""The replay client: the only way actors and the learner talk to the replay service.

Invariants: ``insert`` and ``insert_many`` return only once the server has acknowledged
every group (it is in the log); on a timeout they resend the same groups, which the server
deduplicates by id, so the effect is exactly once. ``insert_many`` keeps at most ``window``
groups unacknowledged, sent in ``insert_batch`` messages of up to ``batch`` groups (each
group encoded once, resent as the same bytes). A reply that does not answer the current
request (a late answer to an earlier try) is ignored. Server-side errors raise
``ReplayError``. Sampled groups are decoded with ``group_from_wire_trusted``: the server
validated each one when it was inserted and sends back the bytes it validated.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import zmq

from flowrl_async.heap import gc_paused
from flowrl_async.records import Group
from flowrl_async.replay.curve import ClientCurve
from flowrl_async.wire import (
    ACCEPTED,
    DUPLICATE,
    TIMEOUT,
    WireLimits,
    decode,
    encode,
    group_from_wire_trusted,
    group_to_wire,
    pack_group,
)

MAX_BATCH_BYTES = 8 << 20  # insert_many: groups per message up to this many bytes (or one)


class ReplayError(RuntimeError):
    """The replay service rejected a request, or did not answer in time."""


class InsertTimeout(ReplayError):
    """The rate limiter held an insert past its timeout; inserting it again is safe."""


def _rejected(msg_type: str, msg: dict) -> ReplayError:
    cls = InsertTimeout if msg.get("code") == "insert_timeout" else ReplayError
    return cls(f"replay service rejected {msg_type}: {msg.get('reason')}")


@dataclass(frozen=True)
class SampleInfo:
    """What the service says about one sampled group: times sampled, staleness, insert time."""

    times_sampled: int
    staleness: int
    inserted_at: float


class ReplayClient:
    """Talks to the replay service: retries until answered, never pickles."""

    def __init__(
        self,
        address: str,
        request_timeout_s: float = 5.0,
        max_retries: int = 60,
        limits: WireLimits = WireLimits(),
        curve_server_key: str | Path | bytes | None = None,
        curve_client_key: str | Path | tuple[bytes, bytes] | None = None,
    ):
        """``curve_server_key``: the server's CURVE public key (a certificate file, or the z85
        key), for a server started with ``curve_secret_key``; ``curve_client_key``: this
        client's secret certificate file (or (public, secret) z85 keys), for a server that
        checks clients, else a fresh key pair (replay/curve.py)."""
        self.address, self.timeout, self.max_retries = address, request_timeout_s, max_retries
        self.limits = limits
        self._curve = None
        if curve_server_key is not None:
            self._curve = ClientCurve.create(curve_server_key, curve_client_key)
        elif curve_client_key is not None:
            raise ValueError("curve_client_key needs curve_server_key (the server's public key)")
        self._rids = itertools.count(1)
        self._ctx = zmq.Context.instance()
        self._sock = None
        self._connect()

    def _connect(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:
            self._curve.apply(self._sock)
        self._sock.connect(self.address)

    def request(
        self, msg_type: str, timeout_s: float | None = None, then=None, **fields
    ) -> tuple[str, dict]:
        """Send until answered (resending after each timeout); -> (reply type, fields), or
        ``then(reply type, fields)`` when given: it runs inside the same garbage-collector
        pause as the decoding (``heap.gc_paused``), so it must make no reference cycles."""
        rid = next(self._rids)
        payload = encode(msg_type, rid=rid, **fields)
        timeout = self.timeout if timeout_s is None else timeout_s
        for _ in range(self.max_retries):
            self._sock.send(payload)
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                if not self._sock.poll(int(left * 1000) + 1):
                    break
                with gc_paused():  # a sampled batch makes ~20k objects and no cycles
                    kind, msg = decode(self._sock.recv(copy=False).buffer, self.limits, False)
                    if msg.get("rid") != rid:
                        continue  # a late answer to an earlier request
                    if kind == "error":
                        raise _rejected(msg_type, msg)
                    if then is None:
                        return kind, msg
                    result = then(kind, msg)
                    del msg  # the decoded tree goes now, uncollected: the pause ends after
                return result
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

    def insert_many(
        self,
        groups: Sequence[Group],
        window: int = 64,
        batch: int | None = None,
        timeout_s: float | None = None,
    ) -> list[bool]:
        """Insert all, keeping up to ``window`` unacknowledged; -> per group, True when new.

        Groups go in ``insert_batch`` messages of up to ``batch`` groups (default: a quarter
        of the window, at most 32, so several messages are in flight). Returns once every
        group is acknowledged. When no answer comes for a request timeout, every
        unacknowledged group is resent on a fresh socket (safe: the server deduplicates by
        group id). A group the server rejects raises ReplayError (InsertTimeout when the
        rate limiter held it too long); inserts already sent may still land, and calling
        again with the same groups is safe. ``timeout_s``: as for ``insert``, the longest the
        server may hold a group for its rate limiter (None: the server's default).
        """
        if window < 1:
            raise ValueError("window must be >= 1")
        batch = max(1, min(32, window // 4)) if batch is None else batch
        if batch < 1:
            raise ValueError("batch must be >= 1")
        packed: list[bytes | None] = [None] * len(groups)  # each encoded once, when first sent
        result: list[bool | None] = [None] * len(groups)
        todo = deque(range(len(groups)))
        sent: dict[int, list[int]] = {}  # rid -> indices into groups
        in_flight, tries = 0, 0
        extra, wait_ms = {}, int(self.timeout * 1000) + 1
        if timeout_s is not None:
            extra, wait_ms = {"timeout_ms": int(timeout_s * 1000)}, wait_ms + int(timeout_s * 1000)
        while todo or sent:
            while todo and in_flight < window:
                indices, size = [], 0
                while todo and len(indices) < batch and in_flight + len(indices) < window:
                    i = todo[0]
                    if packed[i] is None:
                        packed[i] = pack_group(groups[i])
                    if indices and size + len(packed[i]) > MAX_BATCH_BYTES:
                        break  # a message well below the server's size limit
                    indices.append(todo.popleft())
                    size += len(packed[i])
                rid = next(self._rids)
                self._sock.send(
                    encode("insert_batch", rid=rid, groups=[packed[i] for i in indices], **extra)
                )
                sent[rid] = indices
                in_flight += len(indices)
            if not self._sock.poll(wait_ms):
                tries += 1
                if tries >= self.max_retries:
                    raise ReplayError(
                        f"no answer to {in_flight} inserts from {self.address} "
                        f"after {self.max_retries} tries"
                    )
                todo.extendleft(sorted((i for ix in sent.values() for i in ix), reverse=True))
                sent.clear()
                in_flight = 0
                self._connect()
                continue
            kind, msg = decode(self._sock.recv(), self.limits, False)
            indices = sent.pop(msg.get("rid"), None)
            if indices is None:
                continue  # a late answer to an earlier try
            if kind == "error":
                raise _rejected("insert_batch", msg)
            results = msg.get("results")
            if (
                kind != "acks"
                or not isinstance(results, list)
                or len(results) != len(indices)
                or not all(isinstance(r, list) and len(r) == 2 for r in results)
            ):
                raise ReplayError(f"malformed answer to insert_batch: {kind} {msg!r:.200}")
            for i, (status, reason) in zip(indices, results, strict=True):
                if status == TIMEOUT:
                    raise InsertTimeout(f"replay service held group {groups[i].group_id}: {reason}")
                if status not in (ACCEPTED, DUPLICATE):
                    raise ReplayError(
                        f"replay service rejected group {groups[i].group_id}: {reason}"
                    )
                result[i] = status == ACCEPTED
            in_flight -= len(indices)
            tries = 0
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
        return self.request(
            "sample",
            timeout_s=timeout_s + self.timeout,
            then=self._batch,  # decoded in the same collector pause as the reply
            batch_size=batch_size,
            version=version,
            timeout_ms=int(timeout_s * 1000),
            req=uuid.uuid4().hex,  # retries reuse it: the server answers each id once
        )

    def _batch(self, kind: str, msg: dict) -> list[tuple[Group, SampleInfo]] | None:
        if kind == "empty":
            return None
        try:  # the server validated these groups on insert and sends the bytes it validated
            return [
                (group_from_wire_trusted(g), SampleInfo(*info))
                for g, info in zip(msg["groups"], msg["info"], strict=True)
            ]
        except Exception as e:  # a damaged reply: not the groups the server stored
            raise ReplayError(
                f"malformed batch from {self.address}: {type(e).__name__}: {e}"
            ) from e

    def checkpoint(self, tag: str = "") -> dict:
        """Ask for a replay checkpoint now (e.g. with the learner's step as ``tag``);
        -> {path, segment, offset}. Recovery starts from the newest one."""
        _, msg = self.request("checkpoint", tag=tag)
        return {k: msg[k] for k in ("path", "segment", "offset")}

    def prune(self, keep: list[str]) -> list[str]:
        """Delete every replay checkpoint but the newest and those named in ``keep`` (paths
        or file names); -> the file names deleted."""
        return list(self.request("prune", keep=[Path(k).name for k in keep])[1]["deleted"])

    def rewind(self, checkpoint: str) -> dict:
        """The learner resumed from the state it had at replay checkpoint ``checkpoint`` (the
        ``path`` ``checkpoint()`` returned, or its file name): groups sampled since are
        offered again, every group acknowledged since stays, prompt positions handed out
        since are not handed out again; -> {checkpoint, version, size} after the rewind."""
        _, msg = self.request("rewind", checkpoint=checkpoint)
        return {k: msg[k] for k in ("checkpoint", "version", "size")}

    def stats(self) -> dict:
        return {k: v for k, v in self.request("stats")[1].items() if k not in ("v", "t", "rid")}

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
