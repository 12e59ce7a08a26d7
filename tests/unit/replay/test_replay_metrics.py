"""The replay service's runtime figures: rates, rejections by reason, staleness of what it
handed out, and the rate limiter's waits."""

import threading
import time

import msgpack
import pytest

from flowrl_async.replay.client import ReplayClient
from flowrl_async.replay.metrics import RATE_WINDOW_S, ServiceMetrics
from flowrl_async.replay.server import ReplayServer, ServerConfig
from flowrl_async.wire import encode, pack_group

from factories import make_group
from helpers import serve_and_connect


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
    # the sample another client makes 1 s later (long enough for c's request to arrive
    # first on a loaded machine)
    cfg = ServerConfig(str(tmp_path), "tcp://127.0.0.1:0", max_staleness=None, selector="fifo",
                       samples_per_insert=1.0, min_size_to_sample=1, error_buffer=1.0)  # fmt: skip
    server = ReplayServer(cfg)
    thread, _ = serve_and_connect(server)
    client = ReplayClient(server.bound_address, request_timeout_s=2.0, max_retries=1)
    learner = ReplayClient(server.bound_address, request_timeout_s=2.0, max_retries=1)

    def sample_later():
        time.sleep(1.0)
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
    assert waited >= 1.0
    assert stats["inserts_held"] == 1 and 0.5 < stats["insert_wait_s"] <= waited
    assert (stats["samples_held"], stats["inserted"]) == (0, 3)


def test_staleness_buckets_are_fixed_and_cover_every_value():
    from flowrl_async.replay.metrics import STALENESS_BUCKETS, staleness_bucket

    # 0..15 exact, then [2^k, 2^(k+1)) up to 1024+, and "ahead" for negative staleness
    assert [staleness_bucket(s) for s in (0, 1, 15)] == ["0", "1", "15"]
    assert [staleness_bucket(s) for s in (16, 31, 32, 63, 64, 100, 127)] == [
        "16-31", "16-31", "32-63", "32-63", "64-127", "64-127", "64-127",
    ]  # fmt: skip
    assert [staleness_bucket(s) for s in (511, 512, 1023, 1024, 10**9)] == [
        "256-511", "512-1023", "512-1023", "1024+", "1024+",
    ]  # fmt: skip
    assert staleness_bucket(-1) == staleness_bucket(-50) == "ahead"
    assert {staleness_bucket(s) for s in range(-3, 5000)} == set(STALENESS_BUCKETS)
    m = ServiceMetrics()
    m.sampled([70, 70, 200, 3, -1])
    assert m.as_dict(0.0)["sampled_staleness"] == {"3": 1, "64-127": 2, "128-255": 1, "ahead": 1}


def test_the_largest_stats_reply_decodes_with_the_clients_limits(tmp_path):
    # every rejection reason, every staleness value a long run reaches, the rate limiter on:
    # the reply must still decode under the limits every client uses (before buckets, a run
    # whose sampled groups reached 65 distinct staleness values died on this reply)
    from flowrl_async.replay.metrics import REASONS, STALENESS_BUCKETS
    from flowrl_async.wire import MAX_MAP_LEN, WireLimits, decode

    cfg = ServerConfig(str(tmp_path), "tcp://127.0.0.1:0", max_staleness=None,
                       selector="uniform", max_times_sampled=100, samples_per_insert=1.0,
                       min_size_to_sample=1, error_buffer=1.0)  # fmt: skip
    server = ReplayServer(cfg)
    try:
        for reason in (*REASONS, "bad_fly", "whatever"):  # unknown reasons count as "other"
            server._reject(reason)
        server.metrics.sampled(list(range(-5, 5000)))
        server.recovered_checkpoint = str(tmp_path / ("x" * 200))
        stats = server.stats()
    finally:
        server.log.close()
    assert set(stats["rejected_by"]) == set(REASONS)
    assert stats["rejected_by"]["other"] == 3  # "other" itself, "bad_fly", "whatever"
    assert list(stats["sampled_staleness"]) == list(STALENESS_BUCKETS)
    assert len(stats) + 3 <= MAX_MAP_LEN  # v, t, rid
    kind, msg = decode(encode("stats", rid=2**62, **stats), WireLimits())
    assert kind == "stats" and {k: msg[k] for k in stats} == stats


def test_a_reply_never_lists_more_than_the_decoder_accepts(tmp_path):
    from flowrl_async.replay.client import ReplayError
    from flowrl_async.wire import WireLimits, max_array_len

    limits = WireLimits(max_groups=8)
    cfg = ServerConfig(str(tmp_path), "tcp://127.0.0.1:0", max_staleness=None, selector="fifo")
    server = ReplayServer(cfg, limits)
    thread, _ = serve_and_connect(server)
    client = ReplayClient(server.bound_address, request_timeout_s=2.0, max_retries=1)
    try:
        kind, msg = client.request("admit", actor=1, k=1000)  # more than a reply may list
        assert kind == "admitted" and msg["n"] == len(msg["positions"]) == 8
        assert len(msg["positions"]) <= max_array_len(limits)
        with pytest.raises(ReplayError, match=r"batch_size must be in \[1, 8\]"):
            client.sample(9, version=0)
    finally:
        client.close()
        server.stop()
        thread.join(5)


def test_error_reasons_are_cut_so_replies_stay_decodable(tmp_path):
    # a rejected group whose id is just under the 1 MB string limit: its reason quotes the id
    # (and goes over the limit), yet the acks reply must decode on the client
    from flowrl_async.replay.server import MAX_GROUP_REASON
    from flowrl_async.wire import WireLimits, decode, group_to_wire

    cfg = ServerConfig(str(tmp_path), "tcp://127.0.0.1:0", max_staleness=None, selector="fifo")
    server = ReplayServer(cfg)
    try:
        bad = group_to_wire(make_group("x" * (1_048_576 - 20)))
        bad["responses"] = "not a list"  # malformed: rejected with a reason naming the group
        raw = msgpack.packb(bad, use_bin_type=True)
        kind, fields = server.handle("insert_batch", {"groups": [raw] * 8})
    finally:
        server.log.close()
    assert kind == "acks" and all(r[0] == "rejected" for r in fields["results"])
    assert all(len(r[1]) <= MAX_GROUP_REASON for r in fields["results"])
    decode(encode("acks", rid=1, **fields), WireLimits())
