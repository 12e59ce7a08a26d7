"""Requests the replay server answers later: inserts its rate limiter holds back (answered in
arrival order) and samples waiting for enough groups, each until its deadline.

A retry replaces what it retries: a held insert of the same group id keeps its place and
first deadline and answers the new request (``take_insert_waiter``); a held sample with the
same ``req`` is dropped for the new one.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from flowrl_async.wire import GroupInfo

SUPERSEDED = (
    "a later insert of this group took its place in the rate limiter's queue (that request "
    "gets the outcome); resending is safe"
)


@dataclass
class Held:
    """A sample request parked until it can be served or its deadline."""

    identity: bytes
    msg: dict
    deadline: float
    since: float = field(default_factory=time.monotonic)


@dataclass
class BatchReply:
    """The ``acks`` of one ``insert_batch``: sent once no group's outcome is pending."""

    identity: bytes
    rid: object
    results: list
    pending: int = 0
    abandoned: bool = False  # its request already got an error: never send acks


@dataclass
class HeldInsert:
    """A valid new group the rate limiter holds back, and where its outcome goes: a single
    insert's (identity, rid), or a slot (BatchReply, index) of a batch."""

    info: GroupInfo
    obj: dict
    raw: bytes
    deadline: float
    timeout_ms: int
    waiter: tuple
    since: float = field(default_factory=time.monotonic)


@dataclass
class HeldRequests:
    """Inserts and samples the server answers later (rate limiter, too few groups)."""

    inserts: OrderedDict[str, HeldInsert] = field(default_factory=OrderedDict)  # by group id
    samples: dict[str, Held] = field(default_factory=dict)  # by ``req``, in arrival order
    # no deadline comes before these: a serving loop with nothing due scans nothing
    insert_due: float = float("inf")
    sample_due: float = float("inf")

    def __bool__(self) -> bool:
        return bool(self.inserts or self.samples)

    def take_insert_waiter(self, group_id: str, waiter: tuple) -> tuple | None:
        """When ``group_id`` is held: its outcome now goes to ``waiter``; -> the waiter it
        replaced. None when it is not held."""
        held = self.inserts.get(group_id)
        if held is None:
            return None
        old, held.waiter = held.waiter, waiter
        return old

    def hold_insert(self, info: GroupInfo, obj: dict, raw: bytes, timeout_ms: int, waiter) -> None:
        deadline = time.monotonic() + timeout_ms / 1000.0
        self.inserts[info.group_id] = HeldInsert(info, obj, raw, deadline, timeout_ms, waiter)
        self.insert_due = min(self.insert_due, deadline)

    def hold_sample(self, held: Held) -> None:
        req = held.msg.get("req")  # a retry of a held sample replaces it (new socket identity)
        self.samples.pop(req, None)
        self.samples[req] = held
        self.sample_due = min(self.sample_due, held.deadline)

    def expired_inserts(self, now: float) -> list[HeldInsert]:
        """Held inserts past their deadline, removed."""
        if now < self.insert_due:
            return []
        out, self.insert_due = _expire(self.inserts, now)
        return out

    def expired_samples(self, now: float) -> list[Held]:
        """Held samples past their deadline, removed."""
        if now < self.sample_due:
            return []
        out, self.sample_due = _expire(self.samples, now)
        return out


def _expire(held: dict, now: float) -> tuple[list, float]:
    """Remove the entries past their deadline; -> (them, the earliest deadline left)."""
    gone = [key for key, h in held.items() if h.deadline <= now]
    out = [held.pop(key) for key in gone]
    return out, min((h.deadline for h in held.values()), default=float("inf"))
