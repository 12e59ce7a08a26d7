"""The replay service over real zmq sockets, with its log on disk."""

import threading
import time

import msgpack
import pytest
import zmq

from flowrl_async.replay.buffer import Entry, ReplayBuffer
from flowrl_async.replay.client import ReplayClient, ReplayError
from flowrl_async.replay.server import ReplayServer, ServerConfig
from flowrl_async.wire import encode

from factories import make_group


class Running:
    def __init__(self, directory, **kw):
        self.server = ReplayServer(ServerConfig(str(directory), "tcp://127.0.0.1:0", **kw))
        self.thread = threading.Thread(target=self.server.serve, daemon=True)
        self.thread.start()
        while self.server.bound_address is None:
            time.sleep(0.01)
        self.client = ReplayClient(self.server.bound_address, request_timeout_s=2.0, max_retries=2)

    def stop(self):
        self.client.close()
        self.server.stop()
        self.thread.join(5)


@pytest.fixture
def service(tmp_path):
    running = Running(tmp_path / "replay", max_staleness=1, groups_per_version=4)
    yield running
    running.stop()


def test_insert_is_acknowledged_once_and_sampled_fifo(service):
    c = service.client
    assert c.insert(make_group("a")) is True
    assert c.insert(make_group("a")) is False  # a retry: deduplicated
    assert c.insert(make_group("b")) is True
    assert c.sample(3, version=0, timeout_s=0.05) is None  # too few: nothing changes
    batch = c.sample(2, version=0)
    assert [g.group_id for g, _ in batch] == ["a", "b"]
    assert [info.times_sampled for _, info in batch] == [1, 1]
    stats = c.stats()
    assert (stats["inserted"], stats["duplicates"], stats["size"]) == (2, 1, 0)


def test_stale_groups_are_evicted_and_never_returned(service):
    c = service.client
    for gid, version in [("v0", 0), ("v1", 1), ("v2", 2)]:
        c.insert(make_group(gid, version=version))
    # learner at version 2, bound 1: v0 (staleness 2) goes, v1 (1) and v2 (0) stay
    batch = c.sample(2, version=2)
    assert [(g.group_id, info.staleness) for g, info in batch] == [("v1", 1), ("v2", 0)]
    assert c.stats()["evicted_stale"] == 1


def test_admission_capacity_and_work_dispatch(service):
    c = service.client
    # (max_staleness 1 + version 0 + 1) · 4 groups per version = 8 allowed in total
    assert c.admit(actor_id=1, k=5) == [0, 1, 2, 3, 4]
    assert c.admit(actor_id=2, k=5) == [5, 6, 7]
    c.insert(make_group("x", actor_id=1, cursor=0))  # accepted 1, in flight 7: still 8
    assert c.admit(actor_id=2, k=1) == []
    assert c.set_version(1) == 1  # the learner published version 1: 12 allowed in total
    assert c.admit(actor_id=2, k=4) == [8, 9, 10, 11]
    c.release(actor_id=2)  # actor 2 restarted: its 7 positions are handed out again first
    assert c.stats()["in_flight"] == 4
    assert c.admit(actor_id=3, k=3) == [5, 6, 7]
    stats = c.stats()
    assert (stats["in_flight"], stats["cursor"]) == (7, 12)


def test_a_parked_sample_is_served_when_groups_arrive(service):
    result = {}
    t = threading.Thread(
        target=lambda: result.setdefault(
            "b", ReplayClient(service.server.bound_address).sample(1, version=0, timeout_s=3.0)
        )
    )
    t.start()
    time.sleep(0.2)
    service.client.insert(make_group("late"))
    t.join(5)
    assert [g.group_id for g, _ in result["b"]] == ["late"]


def test_bad_input_is_counted_and_loses_nothing(service):
    c = service.client
    c.insert(make_group("keep"))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(service.server.bound_address)
    bad = [
        b"junk",
        encode("insert", rid=1, group={"id": "x"}),
        encode("nope", rid=2),
        msgpack.packb({"v": 1, "t": "sample", "rid": 3, "batch_size": "many"}),
    ]
    for payload in bad:
        sock.send(payload)
        assert sock.poll(2000)
        sock.recv()
    sock.close(0)
    with pytest.raises(ReplayError, match="unknown message type 'nope'"):
        c.request("nope")
    assert c.stats()["rejected"] == 5
    assert [g.group_id for g, _ in c.sample(1, version=0)] == ["keep"]


def test_restart_recovers_acknowledged_and_unused_groups(tmp_path):
    first = Running(tmp_path / "r", max_staleness=None)
    for gid in "abc":
        first.client.insert(make_group(gid))
    assert [g.group_id for g, _ in first.client.sample(1, version=0)] == ["a"]
    assert first.client.admit(actor_id=4, k=2) == [0, 1]
    first.stop()
    second = Running(tmp_path / "r", max_staleness=None)
    try:
        stats = second.client.stats()
        assert stats["recovered_records"] == 5  # 3 inserts, 1 sample, 1 admission
        assert (stats["cursor"], stats["in_flight"]) == (2, 2)
        assert second.client.insert(make_group("a")) is False  # still known
        assert [g.group_id for g, _ in second.client.sample(2, version=0)] == ["b", "c"]
    finally:
        second.stop()


@pytest.mark.parametrize(
    "selector, expected",
    [("fifo", ["g0", "g1"]), ("uniform", None), ("prioritized", None)],
)
def test_selectors_return_distinct_groups(selector, expected):
    buf = ReplayBuffer(
        capacity=10,
        max_staleness=None,
        selector=selector,
        max_times_sampled=1 if selector == "fifo" else 2,
        seed=1,
    )
    for i in range(5):
        buf.insert(Entry(f"g{i}", 0, {}, priority=float(i)))
    picked = [e.group_id for e, _ in buf.sample(2, version=0)]
    assert len(set(picked)) == 2
    if expected:
        assert picked == expected


def test_capacity_eviction_drops_oldest():
    buf = ReplayBuffer(capacity=2, max_staleness=None)
    for i in range(3):
        buf.insert(Entry(f"g{i}", 0, {}))
    assert list(buf.entries) == ["g1", "g2"] and buf.counters.evicted_capacity == 1


def test_mixed_selector_takes_fresh_groups_then_replays_trained_ones():
    buf = ReplayBuffer(capacity=100, max_staleness=None, selector="mixed", max_times_sampled=3,
                       fresh_fraction=0.5, seed=0)  # fmt: skip
    for i in range(4):
        buf.insert(Entry(f"a{i}", 0, {}))
    # nothing trained yet: the whole batch of 4 is fresh, oldest first
    assert [e.group_id for e, _ in buf.sample(4, version=0)] == ["a0", "a1", "a2", "a3"]
    assert buf.sample(4, version=0) is None  # round(0.5·4) = 2 fresh needed, none there
    for i in range(3):
        buf.insert(Entry(f"b{i}", 0, {}))
    picked = [e.group_id for e, _ in buf.sample(4, version=0)]
    assert picked[:2] == ["b0", "b1"]  # 2 fresh, oldest first
    assert len(set(picked[2:])) == 2 and set(picked[2:]) <= {"a0", "a1", "a2", "a3"}  # replay
    with pytest.raises(ValueError, match="max_times_sampled >= 2"):
        ReplayBuffer(selector="mixed", max_times_sampled=1)


def test_admission_paces_actors_even_without_a_staleness_bound():
    buf = ReplayBuffer(capacity=100, max_staleness=None, selector="uniform", max_times_sampled=2)
    # no bound for training, but admission paces as if it were 1: (1 + 0 + 1)·4 = 8
    assert buf.admission_capacity(version=0, groups_per_version=4, in_flight=3) == 5
    assert buf.admission_capacity(version=2, groups_per_version=4, in_flight=0) == 16


@pytest.mark.parametrize(
    "admission, bound, weights, granted",
    [
        ("learner", 1, 1, 16),  # (1 + version 2 + 1) · 4, whatever the actor's weights
        ("weights", 1, 2, 16),  # weights as new as the learner: the same
        ("weights", 1, 1, 12),  # (1 + weights 1 + 1) · 4: trained by version 2 at the latest
        ("weights", 1, 0, 0),  # already beyond the bound: refused in both modes
        ("learner", 1, 0, 0),
        ("weights", 2, 1, 16),  # (2 + 1 + 1) · 4
        ("weights", None, 0, 16),  # no bound: paced from the learner's version, bound 1
    ],
)
def test_admission_counts_from_the_learner_or_the_actors_weights(
    tmp_path, admission, bound, weights, granted
):
    cfg = ServerConfig(
        str(tmp_path), max_staleness=bound, groups_per_version=4, admission=admission,
        selector="uniform" if bound is None else "fifo",
    )  # fmt: skip
    server = ReplayServer(cfg)
    server.handle("version", {"version": 2})
    kind, reply = server.handle("admit", {"actor": 1, "k": 100, "weights": weights})
    assert (kind, reply["n"]) == ("admitted", granted)
    server.log.close()


def test_an_unknown_admission_mode_is_refused():
    with pytest.raises(ValueError, match="admission='oldest'"):
        ServerConfig("x", admission="oldest")


def test_admission_lead_sets_how_far_actors_run_ahead_without_a_staleness_bound(tmp_path):
    from flowrl_async.replay.decisions import new_state

    def capacity(**settings):
        cfg = ServerConfig(str(tmp_path), groups_per_version=4, **settings)
        return new_state(cfg).buffer.admission_capacity(0, 4, in_flight=1)

    assert capacity(max_staleness=None) == (1 + 0 + 1) * 4 - 1  # the default lead: 1
    assert capacity(max_staleness=None, admission_lead=3) == (3 + 0 + 1) * 4 - 1
    assert capacity(max_staleness=2, admission_lead=5) == (2 + 0 + 1) * 4 - 1  # the bound rules


def test_mixed_replay_admission_keeps_a_supply_of_never_trained_groups():
    # batch 8, fresh_fraction 0.5: a supply of max(8, (lead + 1) · 4) never-trained groups,
    # held or in flight, whatever was accepted before (counting from the start admitted a
    # batch a version: a backlog of ever older "fresh" groups)
    buf = ReplayBuffer(100, None, "mixed", 8, fresh_fraction=0.5)
    assert buf.admission_capacity(0, 8, in_flight=0) == 8
    for i in range(8):
        buf.insert(Entry(f"g{i}", 0, {}))
    assert buf.admission_capacity(0, 8, in_flight=0) == 0  # the supply is full
    buf.mark_sampled(buf.select(8))  # step 1 takes the whole batch fresh
    assert buf.admission_capacity(1, 8, in_flight=3) == 8 - 3
    for i in range(8, 13):
        buf.insert(Entry(f"g{i}", 1, {}))
    assert buf.admission_capacity(1, 8, in_flight=0) == 3
    buf.admission_lead = 4  # (4 + 1) · 4 = 20
    assert buf.admission_capacity(50, 8, in_flight=0) == 20 - 5
    held = ReplayBuffer(100, None, "mixed", 8, fresh_fraction=0.0)  # pure replay: a batch
    assert held.admission_capacity(7, 8, in_flight=0) == 8
