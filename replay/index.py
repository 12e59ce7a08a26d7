"""The buffer's indexes, so that every selector picks a group in O(log n) or better.

- ``KeyList``: the keys in an array with each key's place; add and remove in O(1) (the
  last key moves into the hole), k distinct uniform picks in O(k);
- ``SumTree``: a weight per key in a binary tree of partial sums; set and remove in
  O(log n), k distinct picks proportional to weight (without replacement) in O(k log n);
- ``VersionBuckets``: the keys by their oldest version, so that a version rise evicts
  what became stale in O(evicted + log n) instead of a scan of everything held.
"""

from __future__ import annotations

import heapq
import random
from array import array


class KeyList:
    """A set of keys with uniform sampling."""

    def __init__(self):
        self.keys: list[str] = []
        self.pos: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: str) -> None:
        if key not in self.pos:
            self.pos[key] = len(self.keys)
            self.keys.append(key)

    def discard(self, key: str) -> None:
        i = self.pos.pop(key, None)
        if i is None:
            return
        last = self.keys.pop()
        if i < len(self.keys):
            self.keys[i], self.pos[last] = last, i

    def sample(self, rng: random.Random, k: int) -> list[str]:
        return [self.keys[i] for i in rng.sample(range(len(self.keys)), k)]


class SumTree:
    """Keys with positive weights; picks proportional to weight."""

    def __init__(self, leaves: int = 1024):
        self.size = 1
        while self.size < leaves:
            self.size *= 2
        self.tree = array("d", bytes(16 * self.size))  # node i: children 2i, 2i+1; leaves
        self.keys: list[str | None] = [None] * self.size  # from index size on
        self.slot: dict[str, int] = {}
        self.free = list(range(self.size - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.slot)

    @property
    def total(self) -> float:
        return self.tree[1]

    def weight(self, key: str) -> float:
        return self.tree[self.size + self.slot[key]]

    def set(self, key: str, weight: float) -> None:
        if not weight > 0:
            raise ValueError(f"weights must be positive, got {weight}")
        slot = self.slot.get(key)
        if slot is None:
            if not self.free:
                self._grow()
            slot = self.free.pop()
            self.slot[key], self.keys[slot] = slot, key
        self._put(slot, weight)

    def discard(self, key: str) -> None:
        slot = self.slot.pop(key, None)
        if slot is not None:
            self._put(slot, 0.0)
            self.keys[slot] = None
            self.free.append(slot)

    def _put(self, slot: int, weight: float) -> None:
        tree, i = self.tree, slot + self.size
        tree[i] = weight
        i //= 2
        while i:  # sums recomputed from both children: no drift
            tree[i] = tree[2 * i] + tree[2 * i + 1]
            i //= 2

    def _grow(self) -> None:
        old = [(k, self.tree[self.size + s]) for k, s in self.slot.items()]
        self.__init__(2 * self.size)
        for key, weight in old:
            self.set(key, weight)

    def _find(self, u: float) -> int:
        tree, i = self.tree, 1
        while i < self.size:
            left = tree[2 * i]
            if u < left or tree[2 * i + 1] <= 0.0:  # rounding never walks into nothing
                i = 2 * i
            else:
                u -= left
                i = 2 * i + 1
        return i - self.size

    def sample(self, rng: random.Random, k: int) -> list[str]:
        """k distinct keys, each draw proportional to the weights of those not drawn yet
        (each drawn key's weight is zero until the end of the call)."""
        taken: list[tuple[int, float]] = []
        try:
            for _ in range(k):
                total = self.tree[1]
                if not total > 0:
                    break
                slot = self._find(rng.random() * total)
                taken.append((slot, self.tree[self.size + slot]))
                self._put(slot, 0.0)
        finally:
            for slot, weight in taken:
                self._put(slot, weight)
        return [self.keys[slot] for slot, _ in taken]


class VersionBuckets:
    """Keys by version; ``pop_below(v)`` removes and returns those of versions under v."""

    def __init__(self):
        self.buckets: dict[int, dict[str, None]] = {}
        self.heap: list[int] = []  # the versions that have a bucket

    def add(self, key: str, version: int) -> None:
        bucket = self.buckets.get(version)
        if bucket is None:
            bucket = self.buckets[version] = {}
            heapq.heappush(self.heap, version)
        bucket[key] = None

    def discard(self, key: str, version: int) -> None:
        bucket = self.buckets.get(version)
        if bucket is not None:
            bucket.pop(key, None)  # an empty bucket leaves at the next pop_below

    def pop_below(self, version: int) -> list[str]:
        out: list[str] = []
        while self.heap and self.heap[0] < version:
            out.extend(self.buckets.pop(heapq.heappop(self.heap)))
        return out
