"""The samples-per-insert rate limiter: hand-worked sequences, the no-deadlock rule, and the
server holding inserts and samples for it."""

import threading
import time

import pytest
import zmq

from flowrl_async.replay.client import InsertTimeout, ReplayClient, ReplayError
from flowrl_async.replay.rate_limiter import RateLimiter
from flowrl_async.replay.server import ReplayServer, ServerConfig
from flowrl_async.wire import decode, encode, group_to_wire

from factories import make_group


def run(limiter: RateLimiter, ops, removes_on_sample: bool):
    """Drive ``ops`` [(op, allowed, diff after)] with op "i" (insert), "sB" (sample B) or
    "e" (one group evicted without a sample). size = groups held."""
    size = 0
    for step, (op, allowed, diff) in enumerate(ops):
        if op == "e":
            size -= 1
        elif op == "i":
            assert limiter.can_insert(size) is allowed, (step, op)
            if allowed:
                limiter.record_insert()
                size += 1
        else:
            b = int(op[1:])
            assert limiter.can_sample(b, size) is allowed, (step, op)
            if allowed:
                limiter.record_sample(b)
                size -= b if removes_on_sample else 0
        assert limiter.diff == diff, (step, op)


def test_two_samples_per_insert_hand_worked():
    # spi 2, min_size 2, error_buffer 2: min_diff = 2·2 − 2 = 2, max_diff = 2·2 + 2 = 6;
    # groups are never removed, so size = inserts; diff = 2·inserts − samples
    lim = RateLimiter(samples_per_insert=2, min_size_to_sample=2, error_buffer=2)
    assert (lim.min_diff, lim.max_diff) == (2, 6)
    ops = [
        ("s1", False, 0),  # size 0 < min_size 2
        ("i", True, 2),  # size+1 = 1 <= 2: filling up is free
        ("s1", False, 2),  # size 1 < 2
        ("i", True, 4),  # size+1 = 2 <= 2
        ("i", True, 6),  # 3·2 − 0 = 6 <= 6
        ("i", False, 6),  # 4·2 − 0 = 8 > 6: held
        ("s1", True, 5),  # 6 − 1 = 5 >= 2
        ("i", False, 5),  # 8 − 1 = 7 > 6
        ("s2", True, 3),  # 5 − 2 = 3 >= 2
        ("i", True, 5),  # 8 − 3 = 5 <= 6
        ("s4", False, 5),  # 5 − 4 = 1 < 2
        ("s3", True, 2),  # 5 − 3 = 2 >= 2
        ("s1", False, 2),  # 2 − 1 = 1 < 2
        ("i", True, 4),  # 5·2 − 6 = 4 <= 6
    ]
    run(lim, ops, removes_on_sample=False)


def test_half_a_sample_per_insert_with_fifo_removal_hand_worked():
    # spi 0.5, min_size 1, error_buffer 1: min_diff = 0.5 − 1 = −0.5, max_diff = 1.5;
    # each sampled group leaves (fifo), so size = inserts − samples
    lim = RateLimiter(samples_per_insert=0.5, min_size_to_sample=1, error_buffer=1)
    ops = [
        ("s1", False, 0),  # size 0 < 1
        ("i", True, 0.5),  # size+1 = 1 <= 1
        ("i", True, 1.0),  # 2·0.5 − 0 = 1 <= 1.5
        ("i", True, 1.5),  # 1.5 <= 1.5
        ("i", False, 1.5),  # 2.0 > 1.5
        ("s1", True, 0.5),  # 1.5 − 1 = 0.5 >= −0.5
        ("s1", True, -0.5),  # 0.5 − 1 = −0.5 >= −0.5
        ("s1", False, -0.5),  # −1.5 < −0.5 (size 1 would allow it)
        ("i", True, 0.0),  # 4·0.5 − 2 = 0 <= 1.5
        ("i", True, 0.5),
        ("s1", True, -0.5),
    ]
    run(lim, ops, removes_on_sample=True)


def test_inserts_go_ahead_while_the_buffer_is_below_min_size():
    # spi 1, min_size 3, error_buffer 1: max_diff = 3 + 1 = 4. Four inserts reach it; when
    # evictions (staleness, capacity) empty the buffer, inserts go again whatever the diff.
    lim = RateLimiter(samples_per_insert=1, min_size_to_sample=3, error_buffer=1)
    ops = [("i", True, 1), ("i", True, 2), ("i", True, 3), ("i", True, 4), ("i", False, 4)]
    ops += [("e", None, 4)] * 4  # size 4 -> 0, no samples
    ops += [("i", True, 5), ("i", True, 6), ("i", True, 7)]  # size+1 <= 3 each time
    ops += [("i", False, 7), ("s3", True, 4)]  # 8 > 4 held; size 3, 7 − 3 = 4 >= 2
    run(lim, ops, removes_on_sample=True)


@pytest.mark.parametrize(
    "spi, min_size, error_buffer, reason",
    [
        (0, 1, 1, "samples_per_insert must be > 0"),
        (-1, 1, 1, "samples_per_insert must be > 0"),
        (1, 0, 1, "min_size_to_sample must be >= 1"),
        (1, 1, 0.5, r"error_buffer 0.5 < max\(1, samples_per_insert 1\)"),
        (2, 4, 1.5, r"error_buffer 1.5 < max\(1, samples_per_insert 2\)"),
        (0.25, 4, 0.75, r"error_buffer 0.75 < max\(1, samples_per_insert 0.25\)"),
    ],
)
def test_configurations_that_could_deadlock_are_refused(spi, min_size, error_buffer, reason):
    with pytest.raises(ValueError, match=reason):
        RateLimiter(spi, min_size, error_buffer)


def test_boundary_configurations_are_accepted():
    RateLimiter(2, 4, 2)  # error_buffer = max(1, 2)
    RateLimiter(0.25, 4, 1)  # error_buffer = max(1, 0.25)


@pytest.mark.parametrize(
    "batch, reason",
    [
        (3, None),  # 3 <= min_size 4 and 3 + spi 1 = 4 <= 2·error_buffer 4
        (4, r"batch_size 4 \+ samples_per_insert 1 > 2·error_buffer 4"),
        (5, "batch_size 5 > min_size_to_sample 4"),
    ],
)
def test_batch_sizes_that_could_deadlock_are_refused(batch, reason):
    lim = RateLimiter(samples_per_insert=1, min_size_to_sample=4, error_buffer=2)
    if reason is None:
        lim.check_batch(batch)
    else:
        with pytest.raises(ValueError, match=reason):
            lim.check_batch(batch)


def stuck_states(spi, min_size, error_buffer, batch, fifo, max_inserts=24):
    """Every reachable (inserts, samples, size) where neither an insert nor a batch may go
    (a batch also needs ``batch`` groups held). Moves: insert, sample a batch, evict one."""
    lim = RateLimiter(spi, min_size, error_buffer)
    seen, todo, stuck = set(), [(0, 0, 0)], []
    while todo:
        state = todo.pop()
        if state in seen:
            continue
        seen.add(state)
        inserts, samples, size = state
        lim.inserts, lim.samples = inserts, samples
        can_insert = lim.can_insert(size)
        can_sample = size >= batch and lim.can_sample(batch, size)
        if not (can_insert or can_sample):
            stuck.append(state)
        moves = []
        if can_insert and inserts < max_inserts:
            moves.append((inserts + 1, samples, size + 1))
        if can_sample:
            moves.append((inserts, samples + batch, size - batch if fifo else size))
        if size > 0:
            moves.append((inserts, samples, size - 1))  # stale or capacity eviction
        todo.extend(moves)
    return stuck


@pytest.mark.parametrize("fifo", [True, False])
@pytest.mark.parametrize(
    "spi, min_size, error_buffer, batch",
    [(1, 1, 1, 1), (2, 2, 2, 1), (0.5, 4, 1, 1), (1, 4, 2, 3), (2, 3, 2.5, 3), (0.5, 8, 4, 7)],
)
def test_allowed_configurations_never_get_stuck(spi, min_size, error_buffer, batch, fifo):
    RateLimiter(spi, min_size, error_buffer).check_batch(batch)
    assert stuck_states(spi, min_size, error_buffer, batch, fifo) == []


@pytest.mark.parametrize(
    "spi, min_size, error_buffer, batch",
    [
        # min_diff 2.5, max_diff 5.5: 5 inserts give size 5, diff 5; an insert would make
        # 6 > 5.5 and a batch 5 − 3 = 2 < 2.5
        (1, 4, 1.5, 3),
        # min_diff 1, max_diff 3: 6 inserts give diff 3; 3.5 > 3 and 3 − 3 = 0 < 1
        (0.5, 4, 1, 3),
        # batch 5 > min_size 4: evictions leave 4 groups, inserts held by the diff
        (1, 4, 2, 5),
    ],
)
def test_refused_batch_sizes_really_can_get_stuck(spi, min_size, error_buffer, batch):
    with pytest.raises(ValueError):
        RateLimiter(spi, min_size, error_buffer).check_batch(batch)
    assert stuck_states(spi, min_size, error_buffer, batch, fifo=False) != []


# ---------------------------------------------------------------------- in the server
class Running:
    def __init__(self, directory, **kw):
        cfg = ServerConfig(str(directory), "tcp://127.0.0.1:0", max_staleness=None, **kw)
        self.server = ReplayServer(cfg)
        self.thread = threading.Thread(target=self.server.serve, daemon=True)
        self.thread.start()
        while self.server.bound_address is None:
            time.sleep(0.01)
        self.address = self.server.bound_address
        self.client = ReplayClient(self.address, request_timeout_s=2.0, max_retries=2)

    def stop(self):
        self.client.close()
        self.server.stop()
        self.thread.join(5)


# spi 1, min_size 1, error_buffer 1: min_diff = 0, max_diff = 2; uniform keeps groups held
LIMITED = dict(samples_per_insert=1, min_size_to_sample=1, error_buffer=1)
LIMITED_KEEP = dict(LIMITED, selector="uniform", max_times_sampled=100)


def test_a_held_insert_goes_in_when_the_learner_samples(tmp_path):
    running = Running(tmp_path / "r", **LIMITED_KEEP)
    c = running.client
    try:
        assert c.insert(make_group("a")) and c.insert(make_group("b"))  # diff 1, then 2
        got = {}
        t = threading.Thread(target=lambda: got.setdefault("c", c.insert(make_group("c"), 5.0)))
        t.start()  # 3·1 − 0 = 3 > 2: held
        other = ReplayClient(running.address)
        deadline = time.monotonic() + 5
        while other.stats()["held_inserts"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(other.sample(1, version=0)) == 1  # 2 − 1 = 1 >= 0; then 3 − 1 = 2 <= 2
        t.join(5)
        assert got == {"c": True}
        stats = other.stats()
        assert (stats["limiter_inserts"], stats["limiter_samples"], stats["held_inserts"]) == (
            3,
            1,
            0,
        )
        assert stats["limiter_diff"] == 2  # 3·1 − 1
        other.close()
    finally:
        running.stop()


def test_an_insert_held_past_its_timeout_fails_and_can_be_retried(tmp_path):
    running = Running(tmp_path / "r", **LIMITED_KEEP)
    c = running.client
    try:
        c.insert(make_group("a"))
        c.insert(make_group("b"))
        with pytest.raises(InsertTimeout, match="rate limiter: 2 groups held .* max_diff 2"):
            c.insert(make_group("c"), timeout_s=0.05)
        stats = c.stats()
        assert (stats["insert_timeouts"], stats["inserted"], stats["rejected"]) == (1, 2, 0)
        c.sample(1, version=0)
        assert c.insert(make_group("c"), timeout_s=0.05) is True  # the retry goes in once
        assert c.insert(make_group("c")) is False
    finally:
        running.stop()


def test_a_resent_held_insert_replaces_the_first_and_is_answered_once(tmp_path):
    running = Running(tmp_path / "r", **LIMITED_KEEP)
    try:
        running.client.insert(make_group("a"))
        running.client.insert(make_group("b"))
        ctx = zmq.Context.instance()
        first, second = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        for sock in (first, second):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(running.address)
        first.send(encode("insert", rid=1, group=group_to_wire(make_group("c"))))
        deadline = time.monotonic() + 5
        while running.client.stats()["held_inserts"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        # the resend, then a stats request on the same connection: the server handles one
        # connection's messages in order, so the stats answer proves the resend was handled
        second.send(encode("insert", rid=2, group=group_to_wire(make_group("c"))))
        second.send(encode("stats", rid=3))
        assert second.poll(5000)
        kind, msg = decode(second.recv())
        assert (kind, msg["rid"], msg["held_inserts"]) == ("stats", 3, 1)  # replaced, not 2
        running.client.sample(1, version=0)
        assert second.poll(5000)
        kind, msg = decode(second.recv())
        assert (kind, msg["rid"], msg["duplicate"]) == ("ack", 2, False)
        assert not first.poll(100)  # the replaced request gets no answer
        assert running.client.stats()["inserted"] == 3
        first.close(0)
        second.close(0)
    finally:
        running.stop()


def test_a_held_sample_is_served_once_min_size_groups_are_in(tmp_path):
    # spi 1, min_size 2, error_buffer 1: min_diff = 1, max_diff = 3
    running = Running(tmp_path / "r", samples_per_insert=1, min_size_to_sample=2, error_buffer=1)
    try:
        got = {}
        learner = ReplayClient(running.address)
        t = threading.Thread(target=lambda: got.setdefault("b", learner.sample(1, 0, 5.0)))
        t.start()
        running.client.insert(make_group("a"))  # size 1 < 2: the sample stays held
        time.sleep(0.05)
        assert t.is_alive()
        running.client.insert(make_group("b"))  # size 2, diff 2 − 1 = 1 >= 1: served
        t.join(5)
        assert [g.group_id for g, _ in got["b"]] == ["a"]
        learner.close()
    finally:
        running.stop()


def test_a_batch_that_could_deadlock_is_rejected(tmp_path):
    running = Running(tmp_path / "r", samples_per_insert=1, min_size_to_sample=2, error_buffer=1)
    try:
        with pytest.raises(ReplayError, match="batch_size 3 > min_size_to_sample 2"):
            running.client.sample(3, version=0, timeout_s=0.05)
        assert running.client.stats()["rejected"] == 1
    finally:
        running.stop()


def test_server_config_limiter_defaults_and_refusals(tmp_path):
    assert ServerConfig(str(tmp_path)).rate_limiter() is None  # off by default
    lim = ServerConfig(str(tmp_path), samples_per_insert=2, min_size_to_sample=4).rate_limiter()
    assert lim.error_buffer == 6  # max(1, 2) + 4: every batch up to min_size is allowed
    lim.check_batch(4)  # 4 + 2 = 6 <= 2·6 = 12
    with pytest.raises(ValueError, match="deadlock"):
        ReplayServer(ServerConfig(str(tmp_path), samples_per_insert=2, error_buffer=1))


def test_limiter_counters_are_rebuilt_from_the_log(tmp_path):
    first = Running(tmp_path / "r", **LIMITED_KEEP)
    first.client.insert(make_group("a"))
    first.client.insert(make_group("b"))
    first.client.sample(1, version=0)
    first.stop()
    second = Running(tmp_path / "r", **LIMITED_KEEP)
    try:
        stats = second.client.stats()
        assert (stats["limiter_inserts"], stats["limiter_samples"]) == (2, 1)  # diff 1
    finally:
        second.stop()
