"""A retried sample gets the answer it was first given, after a restart too: the ``smp``
record names the request, and recovery keeps the last answers (with the groups' bytes, even
for groups used up since)."""

import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from flowrl_async.replay import checkpoint as ckpt
from flowrl_async.replay.client import ReplayClient
from flowrl_async.replay.log import SegmentLog
from flowrl_async.replay.server import ReplayServer, ServerConfig
from flowrl_async.replay.state import ANSWERS_KEPT
from flowrl_async.wire import decode, group_to_wire

from factories import make_group
from helpers import ServerProcess

FIFO = dict(selector="fifo", max_staleness=None)


def start(directory) -> ReplayServer:
    return ReplayServer(ServerConfig(str(directory), **FIFO))


def insert(server, *gids):
    for gid in gids:
        server.handle("insert", {"group": group_to_wire(make_group(gid))})


def sample(server, n, req):
    """-> (group ids, raw group bytes, info) of a ``batch`` answer."""
    kind, msg = server.handle("sample", {"batch_size": n, "version": 0, "req": req})
    assert kind == "batch"
    groups = list(msg["groups"])
    return [msgpack.unpackb(g)["id"] for g in groups], groups, msg["info"]


def records(directory) -> list[dict]:
    return [msgpack.unpackb(p) for p in SegmentLog(directory).read_all(truncate=False)]


@pytest.mark.parametrize("checkpoint_after", [False, True])
def test_a_retry_after_a_restart_gets_the_same_answer(tmp_path, checkpoint_after):
    directory = tmp_path / "replay"
    server = start(directory)
    insert(server, *"abcdef")
    first = sample(server, 2, "req-1")
    assert first[0] == ["a", "b"]
    assert [i[:2] for i in first[2]] == [[1, 0], [1, 0]]  # sampled once now, staleness 0
    assert records(directory)[-1] == {"k": "smp", "ids": ["a", "b"], "v": 0, "req": "req-1"}
    if checkpoint_after:  # the answer is in the checkpoint; no record after it
        server.checkpoint(tag="x")
    server.log.close()  # the process dies before its answer reaches the learner

    again = start(directory)
    assert again.recovery.records == (0 if checkpoint_after else 7)
    assert "a" not in again.buffer.entries  # used up (FIFO) ...
    assert sample(again, 2, "req-1") == first  # ... yet the retry gets the same bytes, info
    assert sample(again, 2, "req-2")[0] == ["c", "d"]  # a new request: the next groups
    assert sample(again, 2, "req-1") == first
    # the retries logged nothing: a, b were handed out once
    sampled = [gid for r in records(directory) if r["k"] == "smp" for gid in r["ids"]]
    assert sampled == ["a", "b", "c", "d"]
    again.log.close()


def test_the_last_answers_are_kept_and_old_logs_still_recover(tmp_path):
    directory = tmp_path / "replay"
    server = start(directory)
    insert(server, *[f"g{i}" for i in range(ANSWERS_KEPT + 3)])
    # a log written before requests were logged: an smp record without "req"
    server._record({"k": "smp", "ids": ["g0"], "v": 0})
    answers = [sample(server, 1, f"r{i}") for i in range(1, ANSWERS_KEPT + 2)]
    assert list(server.state.answers) == [f"r{i}" for i in range(2, ANSWERS_KEPT + 2)]
    header = server.checkpoint(tag="old")
    live = server.state.snapshot()
    server.log.close()

    again = start(directory)
    assert again.state.snapshot() == live
    for i in range(2, ANSWERS_KEPT + 2):
        assert sample(again, 1, f"r{i}") == answers[i - 1]
    # r1 was forgotten: answered like a new request (the documented bound)
    assert sample(again, 1, "r1")[0] == [f"g{ANSWERS_KEPT + 2}"]
    again.log.close()

    # a checkpoint written before answers were kept, and a log with no "req": no answers
    loaded = ckpt.load(header["path"])
    snapshot = {k: v for k, v in loaded[1].items() if k != "answers"}
    ckpt.write(Path(header["path"]), snapshot, (header["segment"], header["offset"]), "old")
    old = start(directory)
    assert old.recovered_checkpoint == header["path"]
    assert old.state.answers == {"r1": old.state.answers["r1"]}  # only the one logged after
    assert {**old.state.snapshot(), "answers": []} == {
        **again.state.snapshot(),
        "answers": [],
    }
    old.log.close()


class LossyLink:
    """Between the learner's client and the server: forwards every request; while ``lose``
    is set, the replies are lost (kept in ``lost``) as if the server died before sending."""

    def __init__(self, server_address: str):
        self.server_address, self.lose, self.lost = server_address, threading.Event(), []
        ctx = zmq.Context.instance()
        self.front = ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        self.address = f"tcp://127.0.0.1:{self.front.bind_to_random_port('tcp://127.0.0.1')}"
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        ctx, backs, clients, poller = zmq.Context.instance(), {}, {}, zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        while not self._stop.is_set():
            for sock, _ in poller.poll(20):
                if sock is self.front:
                    identity, payload = self.front.recv_multipart()
                    if identity not in backs:  # one connection per client socket
                        back = backs[identity] = ctx.socket(zmq.DEALER)
                        back.setsockopt(zmq.LINGER, 0)
                        back.connect(self.server_address)
                        clients[back] = identity
                        poller.register(back, zmq.POLLIN)
                    backs[identity].send(payload)
                else:
                    payload = sock.recv()
                    if self.lose.is_set():
                        self.lost.append(decode(payload))
                    else:
                        self.front.send_multipart([clients[sock], payload])
        for back in backs.values():
            back.close(0)
        self.front.close(0)

    def close(self):
        self._stop.set()
        self.thread.join(5)


@pytest.mark.integration
def test_a_sample_answered_just_before_a_sigkill_is_answered_again_after_the_restart(
    tmp_path,
):
    directory = tmp_path / "replay"
    fifo = ["--selector", "fifo", "--max-times-sampled", "1", "--fsync", "never"]
    server = ServerProcess(directory, "tcp://127.0.0.1:0", *fifo)
    gids = [f"g{i}" for i in range(10)]
    for gid in gids:
        assert server.client.insert(make_group(gid))
    link = LossyLink(server.address)
    learner = ReplayClient(link.address, request_timeout_s=0.3, max_retries=100)
    got = {}
    try:
        # the server logs the sample and answers; the answer never reaches the learner,
        # and the server is killed: the learner's client retries (same request) until a
        # restarted server answers
        link.lose.set()
        thread = threading.Thread(target=lambda: got.update(batch=learner.sample(4, 0, 0.2)))
        thread.start()
        deadline = time.monotonic() + 10
        while not any(kind == "batch" for kind, _ in link.lost):
            assert time.monotonic() < deadline, "the server never answered the sample"
            time.sleep(0.01)
        server.kill()
        (lost,) = {repr(msg) for kind, msg in link.lost if kind == "batch"}  # retries: the same
        smp = [r for r in records(directory) if r["k"] == "smp"]
        assert [r["ids"] for r in smp] == [gids[:4]]  # logged before the answer was lost
        link.lose.clear()
        server = ServerProcess(directory, server.address, *fifo)
        thread.join(30)
        assert not thread.is_alive()
        batch = got["batch"]
        # the same groups (FIFO: the first four) with the same per-group info as the lost
        # answer
        assert [g.group_id for g, _ in batch] == gids[:4]
        first = next(msg for kind, msg in link.lost if kind == "batch")
        assert repr(first) == lost
        assert [[i.times_sampled, i.staleness, i.inserted_at] for _, i in batch] == first["info"]
        inserted_at = {r["g"]["id"]: r["at"] for r in records(directory) if r["k"] == "ins"}
        assert [i.inserted_at for _, i in batch] == [inserted_at[g] for g in gids[:4]]
        # the learner goes on: the rest come once each, nothing is handed out twice or lost
        rest = server.client.sample(6, version=0, timeout_s=0.5)
        assert [g.group_id for g, _ in rest] == gids[4:]
        stats = server.client.stats()
        assert (stats["inserted"], stats["sampled_groups"], stats["evicted_used"]) == (10, 10, 10)
        assert stats["size"] == 0
        sampled = [gid for r in records(directory) if r["k"] == "smp" for gid in r["ids"]]
        assert sorted(sampled) == gids and len(sampled) == len(set(sampled))
    finally:
        learner.close()
        link.close()
        if server.proc.poll() is None:
            server.stop()
