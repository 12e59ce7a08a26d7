"""The replay buffer: whole groups, deduplicated, with bounded staleness and admission control.

Invariants:
- a group id is accepted at most once, ever (retries of an acknowledged insert are no-ops);
- a group whose oldest version is more than ``max_staleness`` behind the learner's version is
  never returned by ``sample``: it is evicted and counted (``max_staleness=None`` disables
  the bound, for off-policy trajectory balance). Nothing held is ever stale at
  ``self.version``: a group stale on arrival is accepted (its id is seen, it counts as
  inserted) and evicted at once, so ``evict_stale`` scans only when the version rises;
- accounting: inserted == len + evicted_used + evicted_stale + evicted_capacity;
- ``sample`` returns whole groups or nothing: fewer than ``batch_size`` eligible groups give
  None and change no state;
- a group sampled ``max_times_sampled`` times leaves the buffer; FIFO uses each group once;
- when full, the oldest group is evicted (counted) to make room;
- "mixed" (off-policy trajectory balance): a batch is round(fresh_fraction·B) never-sampled
  groups, oldest first, plus groups already trained on, drawn uniformly (replay); while too
  few have been trained on, fresh groups fill the rest. It needs max_times_sampled > 1.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from flowrl_async.replay.config import SELECTORS
from flowrl_async.replay.dedup import Dedup
from flowrl_async.replay.index import KeyList, SumTree, VersionBuckets

WEIGHT_EXPONENT = 512.0  # prioritized weights stay below 2^512 (then are rebased)
TINY = 1e-300  # and above this: a weight never rounds to nothing


@dataclass(slots=True)
class Entry:
    """One held group and what the buffer knows about it."""

    group_id: str
    min_version: int
    payload: bytes  # the group's validated msgpack bytes; sent back as they are
    priority: float = 1.0  # e.g. reward spread within the group
    inserted_at: float = field(default_factory=time.time)
    times_sampled: int = 0
    where: tuple[int, int] | None = None  # its ``ins`` record in the log (segment, offset):
    # checkpoints refer to the group's bytes there instead of holding a copy


@dataclass
class Counters:
    """The buffer's lifetime counts (restored by recovery)."""

    inserted: int = 0
    duplicates: int = 0
    sampled_groups: int = 0
    evicted_stale: int = 0
    evicted_capacity: int = 0
    evicted_used: int = 0


class ReplayBuffer:
    """Held groups, admission, staleness eviction and the selectors."""

    def __init__(
        self,
        capacity: int = 10_000,
        max_staleness: int | None = 1,
        selector: str = "fifo",
        max_times_sampled: int = 1,
        seed: int = 0,
        fresh_fraction: float = 1.0,
    ):
        if selector not in SELECTORS:
            raise ValueError(f"unknown selector {selector!r}; expected one of {SELECTORS}")
        if capacity < 1 or max_times_sampled < 1:
            raise ValueError("capacity and max_times_sampled must be >= 1")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError("max_staleness must be >= 0 or None")
        if selector == "fifo" and max_times_sampled != 1:
            raise ValueError("the fifo selector uses each group once: set max_times_sampled=1")
        if selector == "mixed" and max_times_sampled < 2:
            raise ValueError("the mixed selector replays groups: set max_times_sampled >= 2")
        if not 0.0 <= fresh_fraction <= 1.0:
            raise ValueError(f"fresh_fraction must be in [0, 1], got {fresh_fraction}")
        self.fresh_fraction = fresh_fraction
        self.capacity, self.max_staleness = capacity, max_staleness
        self.selector, self.max_times_sampled = selector, max_times_sampled
        self.rng = random.Random(seed)
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.seen = Dedup()  # the accepted group ids, in bounded memory
        self.counters = Counters()
        self.version = 0  # the learner's, as last reported
        self.newest_version = 0  # the highest min_version of any group accepted
        self.capacity_bytes: int | None = None  # most payload bytes held (None: no bound)
        self.admission_lead = 1  # admission's bound when max_staleness is None
        self.held_bytes = 0  # payload bytes of the held groups
        # priority x 2^(-staleness / half life) when set (freshness-aware prioritised)
        self.priority_half_life: float | None = None
        self._reindex()

    def _reindex(self) -> None:
        """The selector's indexes (replay/index.py), rebuilt from ``entries``."""
        self.by_version = VersionBuckets()  # stale eviction without a scan
        self.all_keys = KeyList()  # uniform
        self.tree = SumTree()  # prioritized
        self.weight_base = self.newest_version  # prioritized with a half life: 2^((v-base)/h)
        self.fresh: OrderedDict[str, None] = OrderedDict()  # mixed: never sampled, in order
        self.used = KeyList()  # mixed: sampled at least once
        for e in self.entries.values():
            self._index(e)

    def _index(self, e: Entry) -> None:
        if self.max_staleness is not None:
            self.by_version.add(e.group_id, e.min_version)
        if self.selector == "uniform":
            self.all_keys.add(e.group_id)
        elif self.selector == "prioritized":
            self.tree.set(e.group_id, self._weight(e))
        elif self.selector == "mixed":
            (self.used.add(e.group_id) if e.times_sampled else self.fresh.setdefault(e.group_id))

    def _weight(self, e: Entry) -> float:
        w = max(e.priority, 1e-6)
        h = self.priority_half_life
        if h is None:
            return w
        # a group "ahead" of the learner (a rewind, or an actor stamping versions it never
        # had) weighs as a fresh one, never more
        version = min(e.min_version, self.version)
        if (version - self.weight_base) / h > WEIGHT_EXPONENT:  # keep 2^x finite
            self.weight_base = version
            for other in self.entries.values():  # O(n), once per WEIGHT_EXPONENT half lives
                if other.group_id in self.tree.slot:
                    self.tree.set(other.group_id, self._weight(other))
        # a common factor 2^(-version/h) leaves the picks' odds alone: weights need no
        # update when the version rises
        return max(w * 2.0 ** ((version - self.weight_base) / h), TINY)

    def __len__(self) -> int:
        return len(self.entries)

    def insert(self, entry: Entry) -> bool:
        """Add a group; False (and nothing changes) when its id was seen before."""
        if entry.group_id in self.seen:  # seen, or too old to tell (never acknowledged)
            self.counters.duplicates += 1
            return False
        self.seen.add(entry.group_id)
        self.counters.inserted += 1
        self.newest_version = max(self.newest_version, entry.min_version)
        if self.max_staleness is not None and self.staleness(entry) > self.max_staleness:
            self.counters.evicted_stale += 1  # stale on arrival: accepted, never held
            return True
        size, cap = len(entry.payload), self.capacity_bytes
        while self.entries and (
            len(self.entries) >= self.capacity or (cap is not None and self.held_bytes + size > cap)
        ):
            self.remove(next(iter(self.entries)))  # the oldest
            self.counters.evicted_capacity += 1
        self.entries[entry.group_id] = entry
        self.held_bytes += size
        self._index(entry)
        return True

    def remove(self, key: str) -> None:
        e = self.entries.pop(key)
        self.held_bytes -= len(e.payload)
        self.by_version.discard(key, e.min_version)
        self.all_keys.discard(key)
        self.tree.discard(key)
        self.fresh.pop(key, None)
        self.used.discard(key)

    def restored(self) -> None:
        """After the entries were replaced wholesale (a restore): bytes and indexes."""
        self.held_bytes = sum(len(e.payload) for e in self.entries.values())
        self._reindex()

    def staleness(self, entry: Entry, version: int | None = None) -> int:
        return (self.version if version is None else version) - entry.min_version

    def evict_stale(self, version: int) -> int:
        """Raise the learner's version to ``version``; evict what became stale."""
        if version <= self.version or self.max_staleness is None:
            self.version = max(self.version, version)
            return 0  # nothing held is stale at self.version (stale arrivals leave at once)
        self.version = version
        stale = [k for k in self.by_version.pop_below(version - self.max_staleness)
                 if k in self.entries]  # fmt: skip
        for k in stale:
            self.remove(k)
        self.counters.evicted_stale += len(stale)
        return len(stale)

    def sample(self, batch_size: int, version: int) -> list[tuple[Entry, int]] | None:
        """``batch_size`` distinct groups with their staleness, or None when too few."""
        self.evict_stale(version)
        chosen = self.select(batch_size)
        if chosen is None:
            return None
        out = [(self.entries[k], self.staleness(self.entries[k])) for k in chosen]
        self.mark_sampled(chosen)
        return out

    def select(self, batch_size: int) -> list[str] | None:
        """Pick ``batch_size`` distinct ids (only the selector's RNG moves), or None."""
        if len(self.entries) < batch_size:
            return None
        if self.selector == "fifo":
            keys = iter(self.entries)
            return [next(keys) for _ in range(batch_size)]
        if self.selector == "mixed":
            return self._mixed(batch_size)
        if self.selector == "uniform":
            return self.all_keys.sample(self.rng, batch_size)
        return self.tree.sample(self.rng, batch_size)  # prioritized: k distinct, by weight

    def _mixed(self, batch_size: int) -> list[str] | None:
        n_replay = min(batch_size - round(self.fresh_fraction * batch_size), len(self.used))
        n_fresh = batch_size - n_replay
        if len(self.fresh) < n_fresh:
            return None  # fresh data paces the learner
        fresh = iter(self.fresh)
        return [next(fresh) for _ in range(n_fresh)] + self.used.sample(self.rng, n_replay)

    def _fresh_supply_room(self, groups_per_version: int, in_flight: int) -> int:
        """Mixed replay without a staleness bound. A batch takes round(fresh_fraction·B)
        never-trained groups once enough have been trained, but a whole batch at first and
        more whenever the trained pool runs short, so counting from the start cannot pace
        it: at a batch a version a backlog of ever older "fresh" groups grows, and at the
        fresh share any step that took more starves admission for good. Admission keeps the
        never-trained supply, held or in flight, at max(a batch, (lead + 1) versions' fresh
        share) instead."""
        share = max(1, round(self.fresh_fraction * groups_per_version))
        supply = max(groups_per_version, (self.admission_lead + 1) * share)
        return max(0, supply - (len(self.fresh) + in_flight))

    def mark_sampled(self, ids: list[str]) -> int:
        """Count one sample of each id still held; used-up groups leave. -> groups counted."""
        n = 0
        for k in ids:
            e = self.entries.get(k)
            if e is None:
                continue
            e.times_sampled += 1
            n += 1
            if e.times_sampled == 1 and self.selector == "mixed":
                self.fresh.pop(k, None)
                self.used.add(k)
            if e.times_sampled >= self.max_times_sampled:
                self.remove(k)
                self.counters.evicted_used += 1
        self.counters.sampled_groups += n
        return n

    def admission_capacity(self, version: int, groups_per_version: int, in_flight: int) -> int:
        """AReaL-style: (max_staleness + version + 1)·groups_per_version − (accepted + in flight),
        where "accepted" leaves out groups evicted as stale: they will never be trained, and
        counting them would shrink the capacity for good (after a restart or a slow
        learner, admission would stay at 0 forever: a deadlock seen in a resumed run).

        Without a staleness bound (off-policy trajectory balance) old groups are still valid
        data, but actors must not run arbitrarily far ahead of the learner (their "fresh"
        groups would be tens of versions old), so admission then paces them as if the bound
        were ``admission_lead`` (1 unless set); mixed replay keeps a supply instead
        (``_fresh_supply_room``).
        """
        if self.max_staleness is None and self.selector == "mixed":
            return self._fresh_supply_room(groups_per_version, in_flight)
        bound = self.admission_lead if self.max_staleness is None else self.max_staleness
        allowed = (bound + version + 1) * groups_per_version
        accepted = self.counters.inserted - self.counters.evicted_stale
        return max(0, allowed - (accepted + in_flight))
