"""insert_batch: one message carrying many groups, one ``acks`` reply with each group's
outcome; the accepted ones are logged together before the reply and stored exactly once."""

import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from flowrl_async.replay.client import InsertTimeout, ReplayClient, ReplayError
from flowrl_async.replay.server import ReplayServer, ServerConfig
from flowrl_async.wire import (
    ACCEPTED,
    DUPLICATE,
    REJECTED,
    TIMEOUT,
    decode,
    encode,
    group_to_wire,
    pack_group,
)

from factories import make_group


class Running:
    def __init__(self, directory, **kw):
        kw = {"max_staleness": None, **kw}
        self.server = ReplayServer(ServerConfig(str(directory), "tcp://127.0.0.1:0", **kw))
        self.thread = threading.Thread(target=self.server.serve, daemon=True)
        self.thread.start()
        while self.server.bound_address is None:
            time.sleep(0.01)
        self.address = self.server.bound_address
        self.client = ReplayClient(self.address, request_timeout_s=2.0, max_retries=2)
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.address)

    def send(self, kind, **fields):
        self.sock.send(encode(kind, **fields))

    def reply(self, timeout_ms=5000):
        assert self.sock.poll(timeout_ms), "no reply"
        return decode(self.sock.recv())

    def stop(self):
        self.sock.close(0)
        self.client.close()
        self.server.stop()
        self.thread.join(5)


@pytest.fixture
def running(tmp_path):
    r = Running(tmp_path / "replay")
    yield r
    r.stop()


def bad_logprobs(gid):
    obj = group_to_wire(make_group(gid))
    obj["responses"][1]["lp"]["b"] = np.float32([-1, 0.5, -1]).tobytes()  # a positive one
    return msgpack.packb(obj, use_bin_type=True)


def test_a_mixed_batch_gets_exact_per_group_results_and_stores_the_good_ones(running):
    c = running.client
    assert c.insert(make_group("old")) is True
    groups = [
        pack_group(make_group("a")),
        pack_group(make_group("old")),  # stored before: duplicate
        bad_logprobs("bad"),  # malformed: rejected with the reason
        pack_group(make_group("b")),
        pack_group(make_group("a")),  # the same id twice in one batch: the second is one
        b"\xc1 not msgpack",
        {"id": "not bytes"},
        pack_group(make_group("c", version=2)),
    ]
    running.send("insert_batch", rid=7, groups=groups)
    kind, msg = running.reply()
    assert (kind, msg["rid"]) == ("acks", 7)
    statuses = [status for status, _ in msg["results"]]
    assert statuses == [ACCEPTED, DUPLICATE, REJECTED, ACCEPTED, DUPLICATE, REJECTED,
                        REJECTED, ACCEPTED]  # fmt: skip
    reasons = [reason for _, reason in msg["results"]]
    assert "group bad response 1: behavior log-probs must be finite and <= 0" in reasons[2]
    assert "not valid msgpack" in reasons[5] and "expected msgpack bytes" in reasons[6]
    assert [reasons[i] for i in (0, 1, 3, 4, 7)] == [""] * 5
    stats = c.stats()
    assert (stats["inserted"], stats["duplicates"], stats["rejected"]) == (4, 2, 3)
    batch = c.sample(4, version=2)
    assert [g.group_id for g, _ in batch] == ["old", "a", "b", "c"]
    assert np.array_equal(batch[1][0].responses[1].behavior_logprobs, np.full(3, -1.5))


def test_batched_inserts_are_logged_once_and_recovered_exactly_once(tmp_path):
    first = Running(tmp_path / "r")
    ids = [f"g{i:03d}" for i in range(50)]
    assert first.client.insert_many([make_group(g) for g in ids], window=16, batch=5) == [True] * 50
    # a resend of everything (as after a lost ack): all duplicates, nothing logged
    assert first.client.insert_many([make_group(g) for g in ids], window=16) == [False] * 50
    first.stop()
    second = Running(tmp_path / "r")
    try:
        stats = second.client.stats()
        assert (stats["recovered_records"], stats["inserted"], stats["size"]) == (50, 50, 50)
        got = second.client.sample(50, version=0)
        assert [g.group_id for g, _ in got] == ids  # fifo: the order they were sent in
    finally:
        second.stop()


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({}, "needs a non-empty list 'groups'"),
        ({"groups": []}, "needs a non-empty list 'groups'"),
        ({"groups": b"x"}, "needs a non-empty list 'groups'"),
        ({"groups": [pack_group(make_group())], "timeout_ms": 1.5}, "'timeout_ms' must be"),
    ],
)
def test_a_malformed_batch_message_gets_one_error(running, fields, reason):
    running.send("insert_batch", rid=1, **fields)
    kind, msg = running.reply()
    assert kind == "error" and reason in msg["reason"]
    assert running.client.stats()["rejected"] == 1
    assert running.client.stats()["inserted"] == 0


def test_too_many_groups_in_one_message_is_an_error(tmp_path):
    from flowrl_async.wire import WireLimits

    limits = WireLimits(max_groups=3)
    server = ReplayServer(ServerConfig(str(tmp_path / "r"), max_staleness=None), limits)
    try:
        with pytest.raises(Exception, match="4 groups exceed the limit of 3"):
            server.handle(
                "insert_batch", {"groups": [pack_group(make_group(f"{i}")) for i in range(4)]}
            )
        assert len(server.buffer) == 0
    finally:
        server.log.close()


def test_insert_many_raises_for_a_rejected_group_after_storing_the_rest(running):
    from flowrl_async.records import Group, Response

    g = make_group("bad")
    r = g.responses[0]
    bad = Group("bad", g.prompt_id, g.prompt_token_ids, g.task,
                (Response(r.token_ids, np.abs(r.behavior_logprobs), 0.0, "stop", 0, 0),))  # fmt: skip
    with pytest.raises(ReplayError, match="rejected group bad: .*finite and <= 0"):
        running.client.insert_many([make_group("ok1"), bad, make_group("ok2")], window=8)
    assert running.client.insert_many([make_group("ok1"), make_group("ok2")]) == [False, False]


# spi 1, min_size 1, error_buffer 1: max_diff 2, so the third insert is held until a sample
LIMITED = dict(samples_per_insert=1, min_size_to_sample=1, error_buffer=1, selector="uniform",
               max_times_sampled=100)  # fmt: skip


def test_a_batch_held_by_the_rate_limiter_is_answered_once_every_group_is_in(tmp_path):
    running = Running(tmp_path / "r", **LIMITED)
    try:
        groups = [pack_group(make_group(g)) for g in ["a", "b", "c", "d"]]
        running.send("insert_batch", rid=5, groups=groups)
        deadline = time.monotonic() + 5
        while running.client.stats()["held_inserts"] != 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not running.sock.poll(50)  # a, b in; c, d held: no answer yet
        assert running.client.stats()["inserted"] == 2
        running.client.sample(1, version=0)  # frees one insert: c
        assert not running.sock.poll(100)
        running.client.sample(1, version=0)  # and d
        kind, msg = running.reply()
        assert (kind, msg["rid"], msg["results"]) == ("acks", 5, [[ACCEPTED, ""]] * 4)
        assert running.client.stats()["inserted"] == 4
    finally:
        running.stop()


def test_held_groups_of_a_batch_time_out_one_by_one_and_a_retry_goes_in_once(tmp_path):
    running = Running(tmp_path / "r", **LIMITED)
    try:
        groups = [pack_group(make_group(g)) for g in ["a", "b", "c"]]
        running.send("insert_batch", rid=1, groups=groups, timeout_ms=50)
        kind, msg = running.reply()
        assert kind == "acks" and [s for s, _ in msg["results"]] == [ACCEPTED, ACCEPTED, TIMEOUT]
        assert "rate limiter" in msg["results"][2][1] and "held 50 ms" in msg["results"][2][1]
        stats = running.client.stats()
        assert (stats["insert_timeouts"], stats["inserted"], stats["held_inserts"]) == (1, 2, 0)
        again = [make_group(g) for g in ["a", "b", "c"]]
        with pytest.raises(InsertTimeout, match="rate limiter"):
            running.client.insert_many(again, timeout_s=0.05)  # nobody samples: c waits
        running.client.sample(1, version=0)
        assert running.client.insert_many(again, timeout_s=0.05) == [
            False,
            False,
            True,
        ]
        assert running.client.stats()["inserted"] == 3
    finally:
        running.stop()


def test_a_retry_of_a_held_group_takes_its_place_and_its_batch_is_still_answered(tmp_path):
    running = Running(tmp_path / "r", **LIMITED)
    try:
        running.client.insert_many([make_group("a"), make_group("b")])  # at max_diff
        groups = [pack_group(make_group(g)) for g in ["c", "d"]]
        running.send("insert_batch", rid=1, groups=groups)  # both held
        deadline = time.monotonic() + 5
        while running.client.stats()["held_inserts"] != 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        # "c" again (a retry from a fresh socket): it takes the first one's place
        retry = zmq.Context.instance().socket(zmq.DEALER)
        retry.setsockopt(zmq.LINGER, 0)
        retry.connect(running.address)
        retry.send(encode("insert", rid=2, group=group_to_wire(make_group("c"))))
        retry.send(encode("stats", rid=3))  # answered in order: the retry has been handled
        assert retry.poll(5000)
        kind, msg = decode(retry.recv())
        assert (kind, msg["rid"], msg["held_inserts"]) == ("stats", 3, 2)
        running.client.sample(1, version=0)  # frees c
        assert retry.poll(5000)
        assert decode(retry.recv())[1]["duplicate"] is False  # the retry gets c's outcome
        running.client.sample(1, version=0)  # frees d: the batch is complete
        kind, msg = running.reply()
        assert kind == "acks" and msg["results"][1] == [ACCEPTED, ""]
        assert msg["results"][0][0] == TIMEOUT and "resending is safe" in msg["results"][0][1]
        stats = running.client.stats()
        assert (stats["inserted"], stats["held_inserts"], stats["insert_timeouts"]) == (4, 0, 0)
        retry.close(0)
    finally:
        running.stop()


def test_a_batch_answered_with_an_internal_error_sends_no_acks_later(tmp_path, monkeypatch):
    import flowrl_async.replay.server as server_module

    real = server_module.unpack_group

    def unpack_or_fail(data, limits):
        if data == b"boom":
            raise RuntimeError("a bug, not bad input")
        return real(data, limits)

    monkeypatch.setattr(server_module, "unpack_group", unpack_or_fail)
    running = Running(tmp_path / "r", **LIMITED)
    try:
        running.client.insert_many([make_group("a"), make_group("b")])  # at max_diff
        running.send("insert_batch", rid=9, groups=[pack_group(make_group("c")), b"boom"])
        kind, msg = running.reply()  # c was held, then the bug: one error for the message
        assert (kind, msg["rid"]) == ("error", 9) and "internal error" in msg["reason"]
        running.client.sample(1, version=0)  # c goes in, as a resend would have put it
        deadline = time.monotonic() + 5
        while running.client.stats()["inserted"] != 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert running.client.stats()["inserted"] == 3
        assert not running.sock.poll(200)  # and the failed request gets no second answer
        assert running.client.stats()["internal_errors"] == 1
    finally:
        running.stop()
