"""Replay service throughput, side by side with raw zmq + msgpack on the same payloads.

Groups of 8 responses × 256 tokens (~17 KB on the wire). Printed, each as a ratio to the
raw figure:
  raw       acknowledged round trips/s: DEALER -> ROUTER in another process, which decodes the
            msgpack message and answers a small ack; up to 64 in flight
  service   acknowledged inserts/s, ``insert_many(window=64)`` and one ``insert`` at a time
            (``python -m flowrl_async.replay.server`` in another process, log on disk,
            fsync every 10 ms)
  service   sampled groups/s with batches of 64 (uniform selector, groups stay), and the
            p50/p99 latency of one ``sample(64)`` call, decoding included

Run: .venv/bin/python benchmarks/replay_throughput.py [--groups 4000] [--samples 200]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import re
import signal
import subprocess
import sys
import tempfile
import time

import msgpack
import numpy as np
import zmq

from flowrl_async.records import Group, Response, SamplingParams
from flowrl_async.replay.client import ReplayClient
from flowrl_async.wire import group_to_wire

RESPONSES, TOKENS, WINDOW, BATCH = 8, 256, 64, 64


def make_groups(n: int, prefix: str, seed: int = 0) -> list[Group]:
    rng = np.random.default_rng(seed)
    groups = []
    for i in range(n):
        responses = tuple(
            Response(
                token_ids=rng.integers(0, 32_000, TOKENS, dtype=np.int32),
                behavior_logprobs=-rng.random(TOKENS, dtype=np.float32),
                reward=float(r % 2),
                finish_reason="stop",
                first_version=0,
                last_version=0,
                info="ok",
            )
            for r in range(RESPONSES)
        )
        groups.append(
            Group(
                f"{prefix}{i}",
                i,
                rng.integers(0, 32_000, 64, dtype=np.int32),
                "digits",
                responses,
                sampling=SamplingParams(1.0, 1.0, TOKENS, RESPONSES),
            )
        )
    return groups


# ------------------------------------------------------------------------------ raw
def echo_server(conn) -> None:
    sock = zmq.Context().socket(zmq.ROUTER)
    conn.send(sock.bind_to_random_port("tcp://127.0.0.1"))
    while True:
        identity, data = sock.recv_multipart()
        msg = msgpack.unpackb(data, raw=False)
        if msg["t"] == "stop":
            break
        sock.send_multipart([identity, msgpack.packb({"v": 1, "t": "ack", "rid": msg["rid"]})])


def raw_round_trips(wires: list[dict]) -> float:
    """Acknowledged round trips/s, up to WINDOW in flight."""
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=echo_server, args=(child,))
    proc.start()
    port = parent.recv()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{port}")

    def run(items: list[dict]) -> float:
        start, sent, acked = time.perf_counter(), 0, 0
        while acked < len(items):
            while sent < len(items) and sent - acked < WINDOW:
                msg = {"v": 1, "t": "insert", "rid": sent, "group": items[sent]}
                sock.send(msgpack.packb(msg, use_bin_type=True))
                sent += 1
            msgpack.unpackb(sock.recv(), raw=False)
            acked += 1
        return len(items) / (time.perf_counter() - start)

    run(wires[:200])  # warm up
    rate = run(wires)
    sock.send(msgpack.packb({"v": 1, "t": "stop", "rid": -1}))
    proc.join(10)
    sock.close(0)
    return rate


# ------------------------------------------------------------------------------ service
def start_service(directory: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowrl_async.replay.server", "--dir", directory]
        + ["--address", "tcp://127.0.0.1:0", "--fsync", "interval", "--fsync-interval-ms", "10"]
        + ["--max-staleness", "-1", "--selector", "uniform", "--max-times-sampled", "1000000"]
        + ["--capacity", "1000000"],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    found = re.search(r"on (tcp://\S+),", line)
    if not found:
        raise RuntimeError(f"replay server did not start: {line!r}")
    return proc, found.group(1)


def service_figures(n: int, samples: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="replay-bench-") as directory:
        proc, address = start_service(directory)
        client = ReplayClient(address, request_timeout_s=30.0)
        try:
            client.insert_many(make_groups(200, "warm", seed=1), window=WINDOW)
            groups = make_groups(n, "w", seed=2)
            start = time.perf_counter()
            client.insert_many(groups, window=WINDOW)
            windowed = n / (time.perf_counter() - start)
            single_groups = make_groups(n // 4, "s", seed=3)
            start = time.perf_counter()
            for g in single_groups:
                client.insert(g)
            single = len(single_groups) / (time.perf_counter() - start)
            for _ in range(5):  # warm up
                client.sample(BATCH, version=0)
            latencies = []
            for _ in range(samples):
                t0 = time.perf_counter()
                batch = client.sample(BATCH, version=0)
                latencies.append(time.perf_counter() - t0)
                assert batch is not None and len(batch) == BATCH
            stats = client.stats()
        finally:
            client.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    assert stats["inserted"] == 200 + n + n // 4, stats
    lat = np.array(latencies) * 1000.0
    return {
        "windowed": windowed,
        "single": single,
        "sampled": BATCH * samples / (sum(latencies)),
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=4000)
    p.add_argument("--samples", type=int, default=200)
    a = p.parse_args(argv)
    wires = [group_to_wire(g) for g in make_groups(a.groups, "raw")]
    size = len(msgpack.packb({"v": 1, "t": "insert", "rid": 0, "group": wires[0]}))
    raw = raw_round_trips(wires)
    s = service_figures(a.groups, a.samples)
    print(f"groups of {RESPONSES} x {TOKENS} tokens, {size} bytes per insert message")
    rows = [
        (f"raw zmq+msgpack round trips (window {WINDOW})", raw, "groups/s"),
        (f"service inserts, insert_many(window={WINDOW})", s["windowed"], "groups/s"),
        ("service inserts, one at a time", s["single"], "groups/s"),
        (f"service sampled groups, batches of {BATCH}", s["sampled"], "groups/s"),
    ]
    for name, value, unit in rows:
        print(f"{name:<48} {value:>10,.0f} {unit}   {value / raw:6.3f} x raw")
    print(f"sample({BATCH}) latency: p50 {s['p50']:.2f} ms, p99 {s['p99']:.2f} ms")


if __name__ == "__main__":
    main()
