"""Replay service throughput, side by side with raw zmq + msgpack on the same payloads.

Groups of 8 responses × 256 tokens (~17 KB on the wire). Printed, each as a ratio to the
raw figure:
  raw       acknowledged round trips/s: DEALER -> ROUTER in another process, which decodes the
            msgpack message and answers a small ack; up to 64 in flight
  service   acknowledged inserts/s, ``insert_many(window=64)`` (batched messages) and one
            ``insert`` at a time (``python -m flowrl_async.replay.server`` in another
            process, log on disk, fsync every 10 ms)
  service   sampled groups/s with batches of 64 (uniform selector, groups stay), and the
            p50/p99 latency of one ``sample(64)`` call, decoding included, in a process
            that imported torch (as the learner's does): as the learner calls it (start-up
            objects frozen, no collection while decoding: flowrl_async/heap.py), and side by
            side without either, with the collections' own time; and the reply alone (sent
            to its bytes received, no decoding): the service's part of a call

On a shared machine the load changes from second to second, so the figures are taken in
``--rounds`` rounds, each measuring raw and then the service right after it on the same
number of fresh groups; printed are the medians over rounds, each ratio the median of the
rounds' own ratios (the latency percentiles pool every round's calls).

Run: .venv/bin/python benchmarks/replay_throughput.py [--groups 1500] [--rounds 5]
     [--samples 60]  (per round)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing as mp
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import msgpack
import numpy as np
import torch  # noqa: F401  (the learner's process imports it: its heap is this big)
import zmq

from flowrl_async import heap as heap_module
from flowrl_async.heap import freeze_survivors
from flowrl_async.records import Group, Response, SamplingParams
from flowrl_async.replay import client as replay_client
from flowrl_async.replay.client import ReplayClient
from flowrl_async.wire import encode, group_to_wire

RESPONSES, TOKENS, WINDOW, BATCH = 8, 256, 64, 64
GC_PAUSES: list[tuple[int, float]] = []  # (generation, ms) of each collection
_gc_started = [0.0]


def _time_gc(phase: str, info: dict) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        GC_PAUSES.append((info["generation"], (time.perf_counter() - _gc_started[0]) * 1000))


gc.callbacks.append(_time_gc)


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


class RawEcho:
    """The raw figure: acknowledged round trips/s to an echo process, up to WINDOW in flight."""

    def __init__(self):
        parent, child = mp.Pipe()
        self.proc = mp.get_context("spawn").Process(target=echo_server, args=(child,))
        self.proc.start()
        port = parent.recv()
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.connect(f"tcp://127.0.0.1:{port}")

    def rate(self, groups: list[Group]) -> float:
        """Round trips/s for these groups (their wire maps made before the clock starts)."""
        wires, sock = [group_to_wire(g) for g in groups], self.sock
        start, sent, acked = time.perf_counter(), 0, 0
        while acked < len(wires):
            while sent < len(wires) and sent - acked < WINDOW:
                msg = {"v": 1, "t": "insert", "rid": sent, "group": wires[sent]}
                sock.send(msgpack.packb(msg, use_bin_type=True))
                sent += 1
            msgpack.unpackb(sock.recv(), raw=False)
            acked += 1
        return len(wires) / (time.perf_counter() - start)

    def close(self) -> None:
        self.sock.send(msgpack.packb({"v": 1, "t": "stop", "rid": -1}))
        self.proc.join(10)
        self.sock.close(0)


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


def one_round(raw: RawEcho, client: ReplayClient, r: int, n: int, samples: int) -> dict:
    """Raw, then the service, on fresh groups of the same shape."""
    out = {"raw": raw.rate(make_groups(n, f"raw{r}-", seed=10 + r))}
    groups = make_groups(n, f"w{r}-", seed=100 + r)
    start = time.perf_counter()
    client.insert_many(groups, window=WINDOW)
    out["windowed"] = n / (time.perf_counter() - start)
    single_groups = make_groups(n // 4, f"s{r}-", seed=200 + r)
    start = time.perf_counter()
    for g in single_groups:
        client.insert(g)
    out["single"] = len(single_groups) / (time.perf_counter() - start)
    for heap in ("careful", "careless"):  # side by side: as shipped, and without GC care
        if heap == "careful":
            freeze_survivors()
            replay_client.gc_paused = heap_module.gc_paused
        else:
            gc.unfreeze()
            replay_client.gc_paused = contextlib.nullcontext
        latencies, kept = [], []
        GC_PAUSES.clear()
        for _ in range(samples):
            t0 = time.perf_counter()
            batch = client.sample(BATCH, version=0)
            latencies.append(time.perf_counter() - t0)
            assert batch is not None and len(batch) == BATCH
            kept = [batch, *kept[:1]]  # a learner holds a batch or two while it trains
        out[f"latencies_{heap}"] = latencies
        out[f"gc_{heap}"] = list(GC_PAUSES)  # wherever they landed, in the call or after
    replay_client.gc_paused = heap_module.gc_paused
    out["sampled"] = BATCH * samples / sum(out["latencies_careful"])
    freeze_survivors()
    out["latencies_reply"] = [reply_latency(client) for _ in range(samples)]
    return out


def reply_latency(client: ReplayClient) -> float:
    """Seconds from sending sample(64) to holding the reply's bytes: the service's part of a
    call, without decoding (the same request ``sample`` sends, on the client's socket)."""
    sock = client._sock
    msg = encode("sample", rid=-1, batch_size=BATCH, version=0, timeout_ms=1000,
                 req=uuid.uuid4().hex)  # fmt: skip
    t0 = time.perf_counter()
    sock.send(msg)
    reply = sock.recv(copy=False)
    elapsed = time.perf_counter() - t0
    assert len(reply.buffer) > BATCH * 17_000
    return elapsed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=1500, help="per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--samples", type=int, default=60, help="sample(64) calls per round")
    a = p.parse_args(argv)
    wire = group_to_wire(make_groups(1, "size")[0])
    size = len(msgpack.packb({"v": 1, "t": "insert", "rid": 0, "group": wire}))
    raw = RawEcho()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="replay-bench-") as directory:
        proc, address = start_service(directory)
        client = ReplayClient(address, request_timeout_s=30.0)
        try:
            raw.rate(make_groups(200, "rawwarm", seed=1))  # warm up both
            client.insert_many(make_groups(200, "warm", seed=1), window=WINDOW)
            for _ in range(5):
                client.sample(BATCH, version=0)
            for r in range(a.rounds):
                rounds.append(one_round(raw, client, r, a.groups, a.samples))
            stats = client.stats()
        finally:
            client.close()
            raw.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    assert stats["inserted"] == 200 + a.rounds * (a.groups + a.groups // 4), stats
    print(f"groups of {RESPONSES} x {TOKENS} tokens, {size} bytes per insert message; "
          f"medians of {a.rounds} rounds of {a.groups} groups")  # fmt: skip
    rows = [
        (f"raw zmq+msgpack round trips (window {WINDOW})", "raw"),
        (f"service inserts, insert_many(window={WINDOW})", "windowed"),
        ("service inserts, one at a time", "single"),
        (f"service sampled groups, batches of {BATCH}", "sampled"),
    ]
    for name, key in rows:
        value = float(np.median([x[key] for x in rounds]))
        ratio = float(np.median([x[key] / x["raw"] for x in rounds]))
        print(f"{name:<48} {value:>10,.0f} groups/s   {ratio:6.3f} x raw")
    per_round = ", ".join(f"{x['windowed'] / x['raw']:.2f}" for x in rounds)
    print(f"insert_many / raw in each round: {per_round}")
    for heap, how in [
        ("careful", "as the learner calls it (heap frozen, GC paused while decoding)"),
        ("careless", "without either"),
        ("reply", "the reply's bytes only (no decoding)"),
    ]:
        lat = np.array([t for x in rounds for t in x[f"latencies_{heap}"]]) * 1000.0
        p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
        print(f"sample({BATCH}) latency, {how}: p50 {p50:.2f} ms, p99 {p99:.2f} ms "
              f"({len(lat)} calls)")  # fmt: skip
        if heap == "reply":
            continue
        pauses = [p for x in rounds for p in x[f"gc_{heap}"]]
        full = [ms for gen, ms in pauses if gen == 2]
        print(f"  garbage collections during those calls' loop: {len(pauses)}, "
              f"{sum(ms for _, ms in pauses):.1f} ms in all; full ones: {len(full)}, "
              f"longest {max(full, default=0.0):.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
