"""Helpers several test modules share: a short run's config and fault hooks, and replay
servers on a thread or as a real process."""

import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import zmq

from flowrl_async.config import TrainConfig
from flowrl_async.replay.client import ReplayClient
from flowrl_async.replay.server import ReplayServer, ServerConfig


def small_config(tmp_path, steps: int, max_staleness: int | None = 0) -> TrainConfig:
    """A short run on the 2-digit task: 4 groups per step, a brief warm-start."""
    cfg = TrainConfig(run_dir=str(tmp_path / "run"))
    cfg.learner.steps = steps
    cfg.learner.batch_groups = 4
    cfg.replay.max_staleness = max_staleness
    cfg.model.warm_start_steps = 10
    cfg.task.kwargs = {"lengths": [2], "min_solutions": 5, "partial_credit": 0.5}
    return cfg


def sigkill_at(step: int, pick):
    """An on_step hook that SIGKILLs the process of ``pick(procs)`` after ``step``."""
    import os
    import signal

    import ray

    def hook(current, procs):
        if current == step:
            os.kill(ray.get(pick(procs).pid.remote()), signal.SIGKILL)

    return hook


def accounted_for(replay: dict) -> bool:
    """Every acknowledged group is buffered, trained, or evicted (as stale or for room)."""
    gone = replay["evicted_used"] + replay["evicted_stale"] + replay["evicted_capacity"]
    return replay["inserted"] == replay["size"] + gone


def serve_and_connect(server: ReplayServer):
    """Serve ``server`` on a thread; -> (that thread, a DEALER socket connected to it)."""
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    while server.bound_address is None:
        time.sleep(0.01)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.bound_address)
    return thread, sock


class ServerProcess:
    """``python -m flowrl_async.replay.server``; ready once it answers a stats request."""

    def __init__(self, directory, address="tcp://127.0.0.1:0", *extra: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flowrl_async.replay.server", "--dir", str(directory)]
            + ["--address", address, "--fsync", "interval", "--max-staleness", "-1"]
            + ["--selector", "uniform", "--max-times-sampled", "1000", *extra],
            stdout=subprocess.PIPE,
            stderr=open(directory.parent / "server.err", "a"),  # noqa: SIM115
            text=True,
        )
        line = self.proc.stdout.readline()  # "replay server on tcp://127.0.0.1:PORT, ..."
        found = re.search(r"replay server on (tcp://[0-9.]+:\d+),", line)
        assert found, f"no address in {line!r}"
        self.address = found.group(1)
        self.client = ReplayClient(self.address, request_timeout_s=0.2, max_retries=50)
        self.stats = self.client.stats()  # answered: ready

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL
        self.client.close()

    def stop(self):
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(10) == 0


@contextmanager
def served_replay(directory, **settings):
    """A ReplayServer on ``directory`` serving on a thread (loopback, a free port); ->
    a ReplayClient connected to it. Stops the server on exit."""
    server = ReplayServer(ServerConfig(str(directory), "tcp://127.0.0.1:0", **settings))
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    while server.bound_address is None:
        time.sleep(0.01)
    client = ReplayClient(server.bound_address)
    try:
        yield client
    finally:
        client.close()
        server.stop()
        thread.join(5)
