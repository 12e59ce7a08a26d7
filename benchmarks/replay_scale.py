"""Replay service at scale: sample(64) latency and memory per held group, 1k to 1M groups.

For each size N and selector, a fresh process builds a ``ReplayServer`` (log on disk,
fsync never: the build is not what is measured) holding N small groups (2 responses × 4
tokens, ~200 bytes on the wire: memory, not the groups' bytes, is what grows), inserted
with ``insert_batch`` messages of 256. Groups stay (max_times_sampled large), so N holds
throughout (mixed, half of each batch fresh: 32 new groups go in before each in-process
sample, the oldest 32 leave). Printed per selector and N, each ratio to the smallest N's
of the same run:
  p50/p99    one ``sample(64)`` handled in process (select, the ``smp`` log record, the
             reply's bytes): the service's own time
  old p99    the selection alone as it was before the indexes (O(n) lists and sorts), on
             the same buffer
  socket p99 ``ReplayClient.sample(64)`` from another process, decoding included, as the
             learner calls it (uniform and prioritized; mixed would run out of fresh groups)
  B/group    the process's RSS growth over the build divided by N; dedup: its entries

Run: .venv/bin/python benchmarks/replay_scale.py [--sizes 1000,10000,100000,1000000]
     [--selectors uniform,prioritized,mixed] [--samples 1000]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

CHILD = "--child"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def tiny_group():
    """-> make(group id, i): a group of 2 responses x 4 tokens, reward spread 0 or 1."""
    from flowrl_async.records import Group, Response, SamplingParams

    def make(gid: str, i: int) -> Group:
        responses = tuple(
            Response(
                np.arange(4, dtype=np.int32) + r,
                np.full(4, -0.5, np.float32),
                float((i + r) % 2 if i % 3 else 0),
                "stop",
                0,
                0,
                "ok",
            )  # fmt: skip
            for r in range(2)
        )
        return Group(gid, i, np.arange(3, dtype=np.int32), "digits", responses,
                     sampling=SamplingParams(1.0, 1.0, 4, 2))  # fmt: skip

    return make


def measure(n: int, selector: str, samples: int, serve: bool) -> dict:
    from flowrl_async.records import GroupIds
    from flowrl_async.replay.server import ReplayServer, ServerConfig
    from flowrl_async.wire import pack_group

    with tempfile.TemporaryDirectory() as d:
        cfg = ServerConfig(d, max_staleness=None, selector=selector, max_times_sampled=10**9,
                           capacity=n, fsync="never", checkpoint_every_mb=None,
                           fresh_fraction=0.5)  # fmt: skip
        server = ReplayServer(cfg)
        ids, template = GroupIds(), tiny_group()
        before = rss_mb()
        t0 = time.perf_counter()
        for start in range(0, n, 256):
            batch = [pack_group(template(ids.next(), i)) for i in range(start, min(n, start + 256))]
            server.handle("insert_batch", {"groups": batch})
        build_s = time.perf_counter() - t0
        grown = rss_mb() - before
        assert len(server.buffer) == n, len(server.buffer)
        lat, more = [], n
        for i in range(samples):
            if selector == "mixed":  # half of each batch is fresh: 32 new groups each time
                batch = [pack_group(template(ids.next(), more + j)) for j in range(32)]
                server.handle("insert_batch", {"groups": batch})  # the oldest 32 leave
                more += 32
            t = time.perf_counter()
            kind, _ = server.handle("sample", {"batch_size": 64, "version": 0, "req": f"r{i}"})
            lat.append((time.perf_counter() - t) * 1000)
            assert kind == "batch"
        old_ms = old_selection_ms(server.buffer, selector)
        stats = server.stats()
        e2e = served_latency(server, samples) if serve else server.log.close()
    return {
        "n": n, "selector": selector, "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)), "bytes_per_group": grown * 2**20 / n,
        "dedup_entries": stats["dedup_entries"], "build_s": build_s, "old_p99": old_ms,
        "e2e_p99": e2e,
    }  # fmt: skip


def old_selection_ms(buffer, selector: str, calls: int = 30) -> float:
    """p99 of the selection alone as it was before the indexes (O(n) per sample): a list of
    every key, then rng.sample (uniform), Efraimidis-Spirakis keys sorted (prioritized), or
    both lists of fresh and trained groups (mixed); on the same buffer, for the ratio."""
    rng, entries, out = random.Random(0), buffer.entries, []
    for _ in range(calls):
        t = time.perf_counter()
        if selector == "uniform":
            rng.sample(list(entries), 64)
        elif selector == "prioritized":
            keys = list(entries)
            sorted(keys, key=lambda k: rng.random() ** (1.0 / max(entries[k].priority, 1e-6)),
                   reverse=True)[:64]  # fmt: skip
        else:
            fresh = [k for k, e in entries.items() if e.times_sampled == 0]
            seen = [k for k, e in entries.items() if e.times_sampled > 0]
            fresh[:32] + rng.sample(seen, min(32, len(seen)))
        out.append((time.perf_counter() - t) * 1000)
    return float(np.percentile(out, 99))


def served_latency(server, samples: int) -> float | None:
    """p99 of ``ReplayClient.sample(64)`` in another process (socket and decoding included,
    as the learner calls it), the server serving on its own thread here."""
    import threading

    if server.cfg.selector == "mixed":
        server.log.close()
        return None
    server.cfg.address = "tcp://127.0.0.1:0"
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    while server.bound_address is None:
        time.sleep(0.01)
    out = subprocess.run([sys.executable, __file__, "--client", server.bound_address,
                          "--samples", str(samples)], capture_output=True, text=True, check=True)  # fmt: skip
    server.stop()
    thread.join(30)
    return float(out.stdout.strip().splitlines()[-1])


def client_p99(address: str, samples: int) -> float:
    from flowrl_async.heap import freeze_survivors
    from flowrl_async.replay.client import ReplayClient

    client = ReplayClient(address, request_timeout_s=30.0)
    freeze_survivors()  # as the learner does (flowrl_async/heap.py)
    lat = []
    for _ in range(samples):
        t = time.perf_counter()
        assert client.sample(64, 0, timeout_s=10.0) is not None
        lat.append((time.perf_counter() - t) * 1000)
    client.close()
    return float(np.percentile(lat, 99))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000,100000,1000000")
    p.add_argument("--selectors", default="uniform,prioritized,mixed")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--no-socket", action="store_true", help="in-process figures only")
    p.add_argument(CHILD, nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--client", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.client:
        print(client_p99(a.client, a.samples))
        return
    if a.child:
        print(json.dumps(measure(int(a.child[0]), a.child[1], a.samples, not a.no_socket)))
        return
    sizes = [int(x) for x in a.sizes.split(",")]
    print(f"{'selector':12} {'held':>9} {'p50 ms':>8} {'p99 ms':>8} {'p99/first':>9} "
          f"{'old p99':>8} {'socket p99':>10} {'/first':>7} {'B/group':>8} {'dedup':>6} "
          f"{'build s':>8}")  # fmt: skip
    for selector in a.selectors.split(","):
        first = None
        for n in sizes:  # each in a fresh process: its memory is its own
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    CHILD,
                    str(n),
                    selector,
                    "--samples",
                    str(a.samples),
                ],  # fmt: skip
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            first = first or (r["p99"], r["e2e_p99"] or 1.0)
            e2e = r["e2e_p99"] or float("nan")
            print(f"{selector:12} {n:>9} {r['p50']:8.3f} {r['p99']:8.3f} {r['p99'] / first[0]:9.2f} "
                  f"{r['old_p99']:8.2f} {e2e:10.2f} {e2e / first[1]:7.2f} "
                  f"{r['bytes_per_group']:8.0f} {r['dedup_entries']:>6} {r['build_s']:8.1f}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
