"""Batch rollouts vs streaming vs streaming with in-flight weight updates, on one vLLM
engine, under a long tail of lengths and a stream of publications.

The tiny built-in model with random weights ends a response with probability ~1/64 a token,
so lengths follow a geometric law cut at ``--max-tokens``: most responses are short, a few
run to the limit. A publication (the other of two weight sets, version + 1) becomes
available every ``--publish-s`` seconds. The arms, one engine in this process, the same spec
and seeds:
- batch (``RolloutLoop``): admits ``--prompts`` prompts, generates them together, waits for
  the slowest, loads a publication between batches;
- streaming, drain (``StreamingLoop``, inflight_updates=false): ``--prompts`` in flight, each
  slot refilled as its group finishes; a waiting publication stops admission and loads once
  the engine has drained;
- in-flight keep / recompute (the default): loads between two engine steps, the running
  sequences going on under the new weights with their keys and values kept or recomputed.
A stand-in replay client admits whatever is asked and acknowledges every insert (the
service's own speed: replay_throughput.py). The arms alternate for ``--rounds`` rounds of
``--seconds`` each. Printed per arm (medians over rounds): generated tokens/s of pushed
groups, the engine's busy share (time inside generate or engine steps over wall time),
publication to first use (seconds from a publication being available to the engine
step that first uses it), and per-token staleness at push (the actor's version minus the
version that sampled each token: what the learner would see if it trained at once), mean
and p95; with the ratio of each arm's tokens/s to batch's in the same round. No learner
runs here, so the learner's waiting share is not measured (async_vs_sync.py has it).

Run: .venv/bin/python benchmarks/inflight.py [--rounds 3] [--seconds 15] [--prompts 8]
     [--n 4] [--max-tokens 128] [--publish-s 1.0]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time

import _common  # noqa: F401  (one thread per process)
import numpy as np


class AdmitAll:
    """A replay client that grants every admission and keeps each pushed group's staleness."""

    def __init__(self):
        self.cursor, self.loop, self.stale = itertools.count(), None, []

    def admit(self, actor_id, k, version=None, weights=None):
        return [next(self.cursor) for _ in range(k)]

    def insert_many(self, groups, **_):
        for g in groups:
            for r in g.responses:
                self.stale.append(self.loop.version - r.token_versions())
        return [True] * len(groups)


class Publisher:
    """A receiver with a new version available every ``period`` seconds of its clock."""

    def __init__(self, states, period: float):
        self.states, self.period, self.version = states, period, 0
        self.t0 = time.perf_counter()
        self.uses: list[float] = []  # per load: seconds from available to first use

    def reset(self) -> None:
        self.t0, self.uses = time.perf_counter(), []

    def available(self) -> float:
        return self.t0 + self.period * (len(self.uses) + 1)

    def waiting(self) -> bool:
        return time.perf_counter() >= self.available()

    def take(self):
        from types import SimpleNamespace

        if not self.waiting():
            return None
        self.uses.append(time.perf_counter() - self.available())  # loaded now, used next
        self.version += 1
        state = self.states[self.version % 2]
        return SimpleNamespace(header=SimpleNamespace(version=self.version, probe_token_ids=()),
                               load_into=lambda gen: gen.load_weights(state.items()))  # fmt: skip


def measure(loop, seconds: float) -> dict:
    stats, replay, pub = loop.stats, loop.replay, loop.receiver
    tokens0, busy0 = stats.tokens, stats.generate_s
    replay.stale.clear()
    pub.reset()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        loop.run_once()
    wall = time.perf_counter() - t0
    if hasattr(loop, "stop_streaming"):
        loop.stop_streaming()  # what is in flight is not counted (nor pushed)
    stale = np.concatenate(replay.stale) if replay.stale else np.zeros(1)
    return {"tok/s": (stats.tokens - tokens0) / wall, "busy": (stats.generate_s - busy0) / wall,
            "use_s": statistics.mean(pub.uses) if pub.uses else float("nan"),
            "stale": float(stale.mean()), "stale_p95": float(np.percentile(stale, 95))}  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--prompts", type=int, default=8, help="batch size / prompts in flight")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--publish-s", type=float, default=1.0)
    a = p.parse_args(argv)

    import torch

    from flowrl_async.actors.generator import SampleSpec
    from flowrl_async.actors.rollout import RolloutLoop
    from flowrl_async.actors.streaming import StreamingLoop
    from flowrl_async.actors.vllm_generator import VLLMGenerator
    from flowrl_async.model import build_tiny_model, load_policy, load_tokenizer
    from flowrl_async.tasks import PromptSource
    from flowrl_async.tasks.sums import DigitPartsTask

    with tempfile.TemporaryDirectory() as d:
        path = build_tiny_model(f"{d}/tiny", seed=0)
        gen = VLLMGenerator(str(path), max_model_len=a.max_tokens + 32, seed=0)
        tok = load_tokenizer(path)
        base = load_policy(path).state_dict()
        other = {k: v + 0.02 * torch.randn_like(v) for k, v in base.items()}
        spec = SampleSpec(n=a.n, temperature=1.0, top_p=1.0, max_tokens=a.max_tokens)

        def loop(kind, **kwargs):
            replay = AdmitAll()
            made = kind(actor_id=1, generator=gen, tokenizer=tok, spec=spec, replay=replay,
                        prompts=PromptSource(DigitPartsTask(), seed=0), **kwargs)  # fmt: skip
            made.receiver, replay.loop = Publisher([base, other], a.publish_s), made
            return made

        loops = {
            "batch": loop(RolloutLoop, groups_per_batch=a.prompts),
            "streaming, drain": loop(StreamingLoop, max_in_flight=a.prompts,
                                     inflight_updates=False),
            "in-flight, keep": loop(StreamingLoop, max_in_flight=a.prompts),
            "in-flight, recompute": loop(StreamingLoop, max_in_flight=a.prompts,
                                         inflight_kv="recompute"),
        }  # fmt: skip
        for each in loops.values():
            measure(each, 2.0)  # warm up
        rows: dict[str, list[dict]] = {k: [] for k in loops}
        print(f"{a.prompts} prompts x {a.n} responses, lengths up to {a.max_tokens} tokens, "
              f"a publication every {a.publish_s} s")  # fmt: skip
        for r in range(a.rounds):
            for name, each in loops.items():
                rows[name].append(measure(each, a.seconds))
            line = " | ".join(f"{k} {v[-1]['tok/s']:.0f}" for k, v in rows.items())
            print(f"round {r + 1} tok/s: {line}", flush=True)
        print(
            "| arm | tokens/s | / batch (per round) | engine busy | publication to first use "
            "(s) | staleness per token, mean | p95 |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, got in rows.items():
            med = {k: statistics.median(x[k] for x in got) for k in got[0]}
            ratios = [x["tok/s"] / b["tok/s"] for x, b in zip(got, rows["batch"], strict=True)]
            print(f"| {name} | {med['tok/s']:.0f} | {', '.join(f'{x:.2f}' for x in ratios)} | "
                  f"{med['busy']:.2f} | {med['use_s']:.3f} | {med['stale']:.2f} | "
                  f"{med['stale_p95']:.0f} |")  # fmt: skip
        gen.close()


if __name__ == "__main__":
    main()
