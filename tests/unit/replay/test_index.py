"""The buffer's indexes (replay/index.py) and the selectors built on them."""

import math
import random
from collections import Counter

import pytest

from flowrl_async.replay.buffer import Entry, ReplayBuffer
from flowrl_async.replay.index import KeyList, SumTree, VersionBuckets


class FixedDraws(random.Random):
    def __init__(self, values):
        super().__init__(0)
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def test_key_list_fills_each_hole_with_the_last_key():
    keys = KeyList()
    for k in "abcd":
        keys.add(k)
    keys.discard("b")
    assert keys.keys == ["a", "d", "c"] and keys.pos == {"a": 0, "d": 1, "c": 2}
    keys.discard("c")
    keys.discard("zz")  # not held: nothing
    assert keys.keys == ["a", "d"] and keys.pos == {"a": 0, "d": 1}
    assert sorted(keys.sample(random.Random(1), 2)) == ["a", "d"]


def test_sum_tree_walks_to_the_key_whose_interval_holds_the_draw():
    tree = SumTree(leaves=4)
    for k, w in zip("abcd", (1.0, 2.0, 3.0, 4.0), strict=True):
        tree.set(k, w)
    assert tree.total == 10.0
    # u = 0.05·10 = 0.5 -> a; then b, c, d are left (total 9): 0.5·9 = 4.5 -> c (2 <= 4.5 < 5)
    assert tree.sample(FixedDraws([0.05, 0.5]), 2) == ["a", "c"]
    assert tree.total == 10.0 and tree.weight("c") == 3.0  # the picks' weights are back
    # 0.99·10 = 9.9 -> d; then 0.99·6 = 5.94 -> c; then 0.0 -> a; then b alone
    assert tree.sample(FixedDraws([0.99, 0.99, 0.0, 0.7]), 4) == ["d", "c", "a", "b"]
    tree.discard("c")
    assert tree.total == 7.0 and len(tree) == 3
    assert tree.sample(FixedDraws([0.5]), 1) == ["d"]  # a [0, 1), b [1, 3), d [3, 7) holds 3.5
    with pytest.raises(ValueError, match="positive"):
        tree.set("e", 0.0)


def test_sum_tree_picks_follow_the_weights_without_replacement():
    tree, w = SumTree(leaves=2), {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    for k, x in w.items():
        tree.set(k, x)  # grows from 2 leaves to 4
    assert tree.size == 4 and tree.total == 10.0
    rng, n = random.Random(7), 40_000
    firsts, pairs = Counter(), Counter()
    for _ in range(n):
        first, second = tree.sample(rng, 2)
        firsts[first] += 1
        pairs[first, second] += 1
    for k, x in w.items():
        assert firsts[k] / n == pytest.approx(x / 10, abs=0.01)
    # P(d then c) = 0.4 · 3 / 6 = 0.2, P(a then b) = 0.1 · 2 / 9
    assert pairs["d", "c"] / n == pytest.approx(0.2, abs=0.01)
    assert pairs["a", "b"] / n == pytest.approx(0.1 * 2 / 9, abs=0.006)
    assert all(a != b for a, b in pairs)


def test_sum_tree_growth_keeps_every_weight():
    tree = SumTree(leaves=2)
    for i in range(1, 3001):
        tree.set(f"k{i}", float(i))
    assert tree.size == 4096 and len(tree) == 3000
    assert tree.total == 3000 * 3001 / 2 and tree.weight("k1234") == 1234.0
    for i in range(1, 3001, 2):
        tree.discard(f"k{i}")
    assert tree.total == sum(range(2, 3001, 2))


def test_version_buckets_pop_only_what_is_below():
    b = VersionBuckets()
    for key, v in [("a", 3), ("b", 1), ("c", 3), ("d", 5), ("e", 1)]:
        b.add(key, v)
    b.discard("c", 3)
    assert b.pop_below(1) == []
    assert b.pop_below(4) == ["b", "e", "a"]
    assert b.pop_below(4) == [] and b.pop_below(6) == ["d"]


def entry(gid, version, priority=1.0):
    return Entry(gid, version, b"x", priority=priority)


def test_stale_groups_leave_by_version_without_touching_the_rest():
    buf = ReplayBuffer(capacity=100, max_staleness=1, selector="uniform", max_times_sampled=5)
    for i, v in enumerate([0, 2, 1, 2, 0]):
        buf.insert(entry(f"g{i}", v))
    assert buf.evict_stale(2) == 2  # versions 0 are 2 behind
    assert list(buf.entries) == ["g1", "g2", "g3"] and buf.counters.evicted_stale == 2
    assert sorted(buf.all_keys.keys) == ["g1", "g2", "g3"]
    assert buf.evict_stale(3) == 1 and list(buf.entries) == ["g1", "g3"]


def test_freshness_aware_priority_halves_per_half_life_of_staleness():
    buf = ReplayBuffer(capacity=100, max_staleness=None, selector="prioritized")
    buf.priority_half_life = 2.0
    buf.evict_stale(4)  # the learner's version
    buf.insert(entry("old", 0, priority=1.0))
    buf.insert(entry("new", 4, priority=1.0))  # 4 versions newer: 2 half lives
    buf.insert(entry("spread", 4, priority=3.0))
    buf.insert(entry("ahead", 9, priority=1.0))  # past the learner: weighs as a fresh one
    w = {k: buf.tree.weight(k) for k in ("old", "new", "spread", "ahead")}
    assert w["new"] / w["old"] == 4.0 and w["spread"] / w["new"] == 3.0
    assert w["ahead"] == w["new"]
    buf.evict_stale(100)  # no staleness bound: nothing leaves
    assert {k: buf.tree.weight(k) for k in w} == w
    bounded = ReplayBuffer(capacity=100, max_staleness=10, selector="prioritized")
    bounded.priority_half_life = 2.0
    bounded.evict_stale(4)
    for k, v in (("old", 0), ("new", 4)):
        bounded.insert(entry(k, v))
    before = {k: bounded.tree.weight(k) for k in ("old", "new")}
    bounded.evict_stale(8)  # a version rise: both staler by 8, the odds unchanged
    assert {k: bounded.tree.weight(k) for k in ("old", "new")} == before
    assert bounded.tree.weight("new") / bounded.tree.weight("old") == 4.0


def test_freshness_weights_stay_finite_over_a_long_run():
    buf = ReplayBuffer(capacity=100, max_staleness=None, selector="prioritized")
    buf.priority_half_life = 1.0
    buf.insert(entry("a", 0))
    buf.evict_stale(514)
    buf.insert(entry("b", 513))  # 2^513 would be near the float limit: rebased
    buf.insert(entry("c", 514))
    assert buf.weight_base == 513
    assert buf.tree.weight("b") == 1.0 and buf.tree.weight("c") == 2.0
    assert buf.tree.weight("a") == 2.0**-513
    buf.evict_stale(1600)
    buf.insert(entry("d", 1600))  # rebased again: a and b fall below the floor
    assert buf.weight_base == 1600 and buf.tree.weight("d") == 1.0
    assert buf.tree.weight("a") == buf.tree.weight("b") == 1e-300
    assert math.isfinite(buf.tree.total)


@pytest.mark.parametrize("selector", ["uniform", "prioritized", "mixed"])
def test_indexes_match_the_held_groups_after_every_change(selector):
    rng = random.Random(3)
    buf = ReplayBuffer(capacity=40, max_staleness=3, selector=selector, max_times_sampled=3,
                       fresh_fraction=0.5)  # fmt: skip
    version = 0
    for step in range(600):
        roll = rng.random()
        if roll < 0.6:
            buf.insert(entry(f"g{step}", rng.randint(max(0, version - 4), version + 1)))
        elif roll < 0.8:
            buf.sample(rng.randint(1, 6), version)
        else:
            version += 1
            buf.evict_stale(version)
        held = set(buf.entries)
        by_version = {k for b in buf.by_version.buckets.values() for k in b}
        assert by_version == held and all(
            k in buf.by_version.buckets[buf.entries[k].min_version] for k in held
        )
        if selector == "uniform":
            assert set(buf.all_keys.keys) == held
        elif selector == "prioritized":
            assert set(buf.tree.slot) == held
            assert all(buf.tree.weight(k) == buf._weight(buf.entries[k]) for k in held)
        else:
            assert set(buf.fresh) | set(buf.used.keys) == held
            assert all(buf.entries[k].times_sampled == 0 for k in buf.fresh)
            assert list(buf.fresh) == [k for k in buf.entries if k in buf.fresh]  # in order
    assert buf.counters.inserted == len(buf) + buf.counters.evicted_used + (
        buf.counters.evicted_stale + buf.counters.evicted_capacity
    )
