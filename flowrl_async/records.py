"""Typed records shared by every process.

A ``Group`` holds all responses to one prompt: the unit of insert, storage and sampling
(FlowRL needs the whole group to normalise rewards). Arrays are numpy (int32 token ids,
float32 log-probs) so the wire codec can send them as raw bytes.

Invariants (checked by ``Group.validate``, which the validating decoder calls on every
group; vectorised over the group's responses):
- every response has as many behaviour log-probs as token ids, all finite and <= 0;
- rewards are finite; 0 <= first_version <= last_version;
- versions are below 2^63;
- a response's ``switches`` (where its tokens' weight version changed: flat pairs
  position, version) have positions rising strictly within [0, len) and versions rising
  strictly from above first_version to exactly last_version (a switch at 0: every token
  from a later version than the prompt's keys and values); with no switches the split is
  unknown (records written before per-token versions) unless first == last;
- a group has at least one response and a non-empty id.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import uuid
from dataclasses import dataclass, field

import numpy as np

FINISH_REASONS = ("stop", "length", "abort")
VERSION_LIMIT = 2**63  # weight versions are int64 wherever they are arrays


class RecordError(ValueError):
    """A record that breaks one of the invariants above."""


@dataclass(frozen=True)
class SamplingParams:
    """The sampling settings a group was generated with."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    n: int = 8


@dataclass(frozen=True)
class Response:
    """One sampled response: its tokens, behaviour log-probs, weight versions, reward and
    verdict."""

    token_ids: np.ndarray  # int32 [L]
    behavior_logprobs: np.ndarray  # float32 [L], log μ(token) at the sampling temperature
    reward: float
    finish_reason: str
    first_version: int  # weight version that generated the first token
    last_version: int  # ... and the last token
    info: str = ""  # the verifier's reason, e.g. "ok", "no answer", "timeout"
    # where the weight version changed, flat pairs (position, version): tokens from
    # ``position`` on were sampled under ``version`` (until the next pair); empty: every token
    # at first_version (or, when last_version is higher, a split not recorded)
    switches: tuple[int, ...] = ()

    def token_versions(self) -> np.ndarray:
        """The weight version of each token, int64 [L] (an unrecorded split: the oldest)."""
        versions = np.full(len(self.token_ids), self.first_version, dtype=np.int64)
        for position, version in zip(self.switches[::2], self.switches[1::2], strict=True):
            versions[position:] = version
        return versions

    def validate(self, where: str = "response") -> None:
        if self.token_ids.ndim != 1 or self.behavior_logprobs.ndim != 1:
            raise RecordError(f"{where}: token_ids and behavior_logprobs must be 1-D")
        n = len(self.token_ids)
        if len(self.behavior_logprobs) != n:
            raise RecordError(
                f"{where}: {n} token ids but {len(self.behavior_logprobs)} behavior log-probs"
            )
        lp = self.behavior_logprobs
        if n and not (np.isfinite(lp).all() and (lp <= 0).all()):
            raise RecordError(f"{where}: behavior log-probs must be finite and <= 0")
        if not math.isfinite(self.reward):
            raise RecordError(f"{where}: reward {self.reward} is not finite")
        if self.finish_reason not in FINISH_REASONS:
            raise RecordError(f"{where}: unknown finish reason {self.finish_reason!r}")
        if not 0 <= self.first_version <= self.last_version < VERSION_LIMIT:
            raise RecordError(
                f"{where}: versions must satisfy 0 <= first ({self.first_version}) "
                f"<= last ({self.last_version}) < 2^63"
            )
        problem = switches_problem(self.switches, n, self.first_version, self.last_version)
        if problem:
            raise RecordError(f"{where}: {problem}")


def switches_problem(switches, n: int, first: int, last: int) -> str | None:
    """What is wrong with a response's version switches (see ``Response``), or None."""
    if not switches:
        return None
    if len(switches) % 2 or not all(type(x) is int for x in switches):
        return "switches must be pairs of integers (position, version)"
    positions, versions = switches[::2], switches[1::2]
    steps = zip(positions, positions[1:], strict=False)
    if not (0 <= positions[0] and positions[-1] < n and all(a < b for a, b in steps)):
        return f"switch positions must rise strictly within [0, {n})"
    steps = zip(versions, versions[1:], strict=False)
    if not (first < versions[0] and versions[-1] == last and all(a < b for a, b in steps)):
        return (f"switch versions must rise strictly from above first ({first}) to last "
                f"({last})")  # fmt: skip
    return None


@dataclass(frozen=True)
class Group:
    """All responses to one prompt: the unit of insert, storage and sampling."""

    group_id: str
    prompt_id: int
    prompt_token_ids: np.ndarray  # int32 [P]
    task: str
    responses: tuple[Response, ...]
    actor_id: int = 0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    cursor: int = -1  # position in the prompt stream handed out at admission (-1: none)
    created_at: float = 0.0  # when generation started (unix seconds)
    finished_at: float = 0.0  # when the group was verified

    @property
    def min_version(self) -> int:
        """The oldest weight version that generated any token of this group."""
        return min(r.first_version for r in self.responses)

    @property
    def rewards(self) -> np.ndarray:
        return np.array([r.reward for r in self.responses], dtype=np.float64)

    def validate(self) -> None:
        """Raise RecordError for a broken invariant. One pass of cheap scalar checks and one
        vectorised check of all behaviour log-probs together; only when something is wrong
        does the response-by-response check run, to report the first fault exactly."""
        if self._valid():
            return
        if not self.group_id:
            raise RecordError("group: empty group id")
        if not self.responses:
            raise RecordError(f"group {self.group_id}: no responses")
        if self.prompt_token_ids.ndim != 1:
            raise RecordError(f"group {self.group_id}: prompt_token_ids must be 1-D")
        for i, response in enumerate(self.responses):
            response.validate(f"group {self.group_id} response {i}")
        raise RecordError(f"group {self.group_id}: invalid")  # unreachable: _valid agrees

    def _valid(self) -> bool:
        """Exactly the checks of the slow path in ``validate``, as one boolean."""
        if not self.group_id or not self.responses or self.prompt_token_ids.ndim != 1:
            return False
        logprobs = []
        for r in self.responses:
            tok, lp = r.token_ids, r.behavior_logprobs
            if tok.ndim != 1 or lp.ndim != 1 or lp.shape[0] != tok.shape[0]:
                return False
            if r.finish_reason not in FINISH_REASONS or not math.isfinite(r.reward):
                return False
            if not 0 <= r.first_version <= r.last_version < VERSION_LIMIT:
                return False
            if r.switches and switches_problem(r.switches, tok.shape[0], r.first_version,
                                               r.last_version):  # fmt: skip
                return False
            logprobs.append(lp)
        lp = np.concatenate(logprobs) if len(logprobs) > 1 else logprobs[0]
        # finite and <= 0 for all: the max is <= 0 (false if any NaN or +inf) and the min is
        # above -inf
        return lp.size == 0 or bool(lp.max() <= 0 and lp.min() > -np.inf)


class GroupIds:
    """Group ids ``<producer>-<seq>``: a producer drawn at random once (32 hex digits) and a
    seq counting its groups from 0. The replay service deduplicates such ids by a watermark
    per producer (replay/dedup.py), in memory bounded by producers, not groups; ids must
    therefore be made in the order the groups are inserted, give or take the window of ``replay/dedup.py``."""

    def __init__(self):
        self.producer = uuid.uuid4().hex
        self._seq = itertools.count()
        self._lock = threading.Lock()

    def next(self) -> str:
        with self._lock:
            return f"{self.producer}-{next(self._seq)}"


_IDS = GroupIds()
os.register_at_fork(after_in_child=lambda: globals().update(_IDS=GroupIds()))


def new_group_id() -> str:
    """The next id of this process's producer (a forked child draws a producer of its own)."""
    return _IDS.next()
