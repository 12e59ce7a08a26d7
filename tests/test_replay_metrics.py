"""The replay service's runtime figures: rates, rejections by reason, staleness of what it
handed out, and the rate limiter's waits."""

import threading
import time

import msgpack
import pytest
from test_replay_fuzz import serve_and_connect

from flowrl_async.replay.client import ReplayClient
from flowrl_async.replay.metrics import RATE_WINDOW_S, ServiceMetrics
from flowrl_async.replay.server import ReplayServer, ServerConfig
from flowrl_async.wire import encode, pack_group

from factories import make_group


def test_rates_over_the_window_from_marks_at_most_a_second_apart():
    m = ServiceMetrics()
    assert m.rates(5.0) == (0.0, 0.0)  # no mark yet
    m.mark(0.0)
    m.inserted(7)
    m.mark(0.5)  # within a second of the last mark: not noted
    m.inserted(3)
    m.sampled([0, 1, 1, -1])
    m.mark(1.0)
    m.inserted(20)
    assert m.rates(2.0) == (15.0, 2.0)  # 30 inserts, 4 samples since the mark at 0 s
    for t in range(2, 31):  # then 10 inserts and 4 samples a second
        m.inserted(10)
        m.sampled([0] * 4)
        m.mark(float(t))
    # the oldest mark kept is the newest one at least RATE_WINDOW_S old
    assert m._marks[0][0] == 30.0 - RATE_WINDOW_S
    assert m.rates(30.0) == pytest.approx((10.0, 4.0))
    assert m.as_dict(30.0)["sampled_staleness"] == {"0": 1 + 29 * 4, "1": 2, "ahead": 1}


def test_a_live_server_counts_rejections_by_reason_staleness_and_waits(tmp_path):
    cfg = ServerConfig(str(tmp_path), "tcp://127.0.0.1:0", max_staleness=2, selector="fifo")
    server = ReplayServer(cfg)
    thread, sock = serve_and_connect(server)
    client = ReplayClient(server.bound_address, request_timeout_s=2.0, max_retries=1)
    try:
        bad = [
            [b"a", b"b"],  # two message frames
            [b"\xc1"],  # not msgpack
            [encode("sample", rid=1, batch_size=1, version=0)],  # no request id
            [encode("sample", rid=2, batch_size=0, version=0, req="x")],
            [encode("fly", rid=3)],
            [encode("insert_batch", rid=4, groups=[b"junk", pack_group(make_group("ok"))])],
        ]
        for frames in bad:
            sock.send_multipart(frames)
            assert sock.poll(5000)
            sock.recv_multipart()
        for gid, version in [("v0", 0), ("v1", 1), ("v2", 2)]:
            client.insert(make_group(gid, version=version))
        assert len(client.sample(2, version=2)) == 2  # "ok" (v0) and v0: staleness 2, 2
        assert len(client.sample(2, version=2)) == 2  # v1, v2: staleness 1, 0
        started = time.monotonic()
        assert client.sample(1, version=2, timeout_s=0.2) is None  # held, then empty
        assert time.monotonic() - started >= 0.2
        stats = client.stats()
    finally:
        client.close()
        sock.close(0)
        server.stop()
        thread.join(5)
    assert stats["rejected_by"] == {
        "bad_group": 1,
        "bad_sample": 2,
        "frames": 1,
        "undecodable": 1,
        "unknown_type": 1,
    }
    assert stats["rejected"] == 6
    assert stats["sampled_staleness"] == {"0": 1, "1": 1, "2": 2}
    assert stats["samples_held"] == 1 and 0.2 <= stats["sample_wait_s"] < 2.0
    assert (stats["inserts_held"], stats["insert_wait_s"]) == (0, 0.0)
    assert stats["inserts_per_s"] > 0 and stats["sampled_groups_per_s"] > 0
    assert msgpack.unpackb(msgpack.packb(stats)) == stats  # plain data


def test_held_inserts_count_as_rate_limiter_waits(tmp_path):
    # one sample per insert, at most 2 ahead (max_diff = 1·1 + 1): a and b go, c waits for
    # the sample another client makes 0.3 s later
    cfg = ServerConfig(str(tmp_path), "tcp://127.0.0.1:0", max_staleness=None, selector="fifo",
                       samples_per_insert=1.0, min_size_to_sample=1, error_buffer=1.0)  # fmt: skip
    server = ReplayServer(cfg)
    thread, _ = serve_and_connect(server)
    client = ReplayClient(server.bound_address, request_timeout_s=2.0, max_retries=1)
    learner = ReplayClient(server.bound_address, request_timeout_s=2.0, max_retries=1)

    def sample_later():
        time.sleep(0.3)
        assert len(learner.sample(1, version=0)) == 1

    sampler = threading.Thread(target=sample_later)
    try:
        client.insert_many([make_group("a"), make_group("b")])
        started = time.monotonic()
        sampler.start()
        client.insert_many([make_group("c")], timeout_s=5.0)  # held until that sample
        waited = time.monotonic() - started
        sampler.join(5)
        stats = client.stats()
    finally:
        client.close()
        learner.close()
        server.stop()
        thread.join(5)
    assert waited >= 0.3
    assert stats["inserts_held"] == 1 and 0.2 < stats["insert_wait_s"] <= waited
    assert (stats["samples_held"], stats["inserted"]) == (0, 3)
