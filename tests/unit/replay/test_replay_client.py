"""ReplayClient.insert_many: a bounded window of unacknowledged inserts, resent on silence."""

import threading
import time

import numpy as np
import pytest
import zmq

from flowrl_async.records import Group, Response
from flowrl_async.replay.client import ReplayClient, ReplayError
from flowrl_async.replay.server import ReplayServer, ServerConfig
from flowrl_async.wire import ACCEPTED, DUPLICATE, decode, encode, unpack_group

from factories import make_group


@pytest.fixture
def server(tmp_path):
    srv = ReplayServer(ServerConfig(str(tmp_path / "r"), "tcp://127.0.0.1:0", max_staleness=None))
    thread = threading.Thread(target=srv.serve, daemon=True)
    thread.start()
    while srv.bound_address is None:
        time.sleep(0.01)
    yield srv
    srv.stop()
    thread.join(5)


def test_insert_many_keeps_order_and_reports_duplicates(server):
    client = ReplayClient(server.bound_address, request_timeout_s=2.0, max_retries=2)
    ids = [f"g{i:03d}" for i in range(200)]
    assert client.insert_many([make_group(g) for g in ids], window=16) == [True] * 200
    again = [make_group("g005"), make_group("new"), make_group("g199")]
    assert client.insert_many(again, window=2) == [False, True, False]
    # one socket, in-order delivery: the fifo order is the order of the list
    assert [g.group_id for g, _ in client.sample(201, version=0)] == ids + ["new"]
    assert (client.stats()["inserted"], client.stats()["duplicates"]) == (201, 2)
    client.close()


def test_insert_many_raises_on_a_rejected_group(server):
    client = ReplayClient(server.bound_address, request_timeout_s=2.0, max_retries=2)
    g = make_group("bad")
    r = g.responses[0]
    bad = Group(
        "bad",
        g.prompt_id,
        g.prompt_token_ids,
        g.task,
        (Response(r.token_ids, np.abs(r.behavior_logprobs), 0.0, "stop", 0, 0),),
    )  # positive behaviour log-probs: the server's decoder refuses the group
    with pytest.raises(ReplayError, match="finite and <= 0"):
        client.insert_many([make_group("ok"), bad], window=4)
    with pytest.raises(ValueError, match="window must be >= 1"):
        client.insert_many([], window=0)
    client.close()


def test_unanswered_inserts_are_resent_and_deduplicated():
    """A fake service that ignores the first 5 requests and, for 2 more, inserts but loses
    the answer; the client must still end with every group acknowledged."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    seen, received = set(), []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            if not router.poll(20):
                continue
            identity, data = router.recv_multipart()
            kind, msg = decode(data)
            assert kind == "insert_batch" and len(msg["groups"]) == 1  # batch=1 below
            gid = unpack_group(msg["groups"][0])[1].group_id
            received.append(gid)
            if len(received) <= 5:
                continue  # dropped: never inserted, never answered
            duplicate = gid in seen
            seen.add(gid)
            if len(received) <= 7:
                continue  # inserted, answer lost
            status = DUPLICATE if duplicate else ACCEPTED
            router.send_multipart(
                [identity, encode("acks", rid=msg["rid"], results=[[status, ""]])]
            )

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        client = ReplayClient(f"tcp://127.0.0.1:{port}", request_timeout_s=0.2, max_retries=5)
        ids = [f"g{i}" for i in range(10)]
        result = client.insert_many([make_group(g) for g in ids], window=4, batch=1)
        # window 4, one group per message: g0-g3 sent and dropped (received 1-4). 0.2 s of
        # silence: all four are resent on a fresh socket: g0 dropped (5), g1 and g2
        # inserted with the answer lost
        # (6, 7), g3 answered (8); then g4..g9 go through the window, answered. Silence
        # again: g0, g1, g2 resent; g0 is new, g1 and g2 come back as duplicates
        assert result == [True, False, False] + [True] * 7
        assert seen == set(ids)
        assert received[:5] == ["g0", "g1", "g2", "g3", "g0"]
        client.close()
    finally:
        stop.set()
        thread.join(5)
        router.close(0)
