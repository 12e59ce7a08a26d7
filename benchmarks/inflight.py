"""Batch rollouts vs streaming rollouts on one vLLM engine, under a long tail of lengths.

The tiny built-in model with random weights ends a response with probability ~1/64 a token,
so lengths follow a geometric law cut at ``--max-tokens``: most responses are short, a few
run to the limit. Batch mode (``RolloutLoop``) admits ``--prompts`` prompts, generates them
together and waits for the slowest; streaming (``StreamingLoop``) keeps ``--prompts`` in
flight and refills each slot as its group finishes. One engine in this process, the same
spec and seeds; a stand-in replay client admits whatever is asked and acknowledges every
insert (the service's own speed: replay_throughput.py). The modes alternate for
``--rounds`` rounds of ``--seconds`` each; printed per round and as medians: generated
tokens/s of pushed groups, groups/s, and the engine's busy share (time inside generate or
engine steps over wall time), with the streaming/batch ratio of each round.

Run: .venv/bin/python benchmarks/inflight.py [--rounds 3] [--seconds 20] [--prompts 8]
     [--n 4] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time

import _common  # noqa: F401  (one thread per process)


class AdmitAll:
    """A replay client that grants every admission and acknowledges every insert."""

    def __init__(self):
        self.cursor, self.inserted = itertools.count(), 0

    def admit(self, actor_id, k, version=None, weights=None):
        return [next(self.cursor) for _ in range(k)]

    def insert_many(self, groups, **_):
        self.inserted += len(groups)
        return [True] * len(groups)


def measure(loop, seconds: float) -> dict:
    stats = loop.stats
    tokens0, groups0, busy0 = stats.tokens, stats.groups, stats.generate_s
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        loop.run_once()
    wall = time.perf_counter() - t0
    if hasattr(loop, "stop_streaming"):
        loop.stop_streaming()  # what is in flight is not counted (nor pushed)
    return {"tok/s": (stats.tokens - tokens0) / wall, "groups/s": (stats.groups - groups0) / wall,
            "busy": (stats.generate_s - busy0) / wall}  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--prompts", type=int, default=8, help="batch size / prompts in flight")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    a = p.parse_args(argv)

    from flowrl_async.actors.generator import SampleSpec
    from flowrl_async.actors.rollout import RolloutLoop
    from flowrl_async.actors.streaming import StreamingLoop
    from flowrl_async.actors.vllm_generator import VLLMGenerator
    from flowrl_async.model import build_tiny_model, load_tokenizer
    from flowrl_async.tasks import PromptSource
    from flowrl_async.tasks.sums import DigitPartsTask

    with tempfile.TemporaryDirectory() as d:
        path = build_tiny_model(f"{d}/tiny", seed=0)
        gen = VLLMGenerator(str(path), max_model_len=a.max_tokens + 32, seed=0)
        tok = load_tokenizer(path)
        spec = SampleSpec(n=a.n, temperature=1.0, top_p=1.0, max_tokens=a.max_tokens)
        common = dict(actor_id=1, generator=gen, tokenizer=tok, spec=spec)
        loops = {
            "batch": RolloutLoop(prompts=PromptSource(DigitPartsTask(), seed=0), replay=AdmitAll(),
                                 groups_per_batch=a.prompts, **common),
            "streaming": StreamingLoop(prompts=PromptSource(DigitPartsTask(), seed=0),
                                       replay=AdmitAll(), max_in_flight=a.prompts, **common),
        }  # fmt: skip
        for loop in loops.values():
            measure(loop, 2.0)  # warm up
        rows: dict[str, list[dict]] = {k: [] for k in loops}
        print(f"{a.prompts} prompts x {a.n} responses, lengths up to {a.max_tokens} tokens")
        for r in range(a.rounds):
            for name, loop in loops.items():
                rows[name].append(measure(loop, a.seconds))
            b, s = rows["batch"][-1], rows["streaming"][-1]
            print(f"round {r + 1}: batch {b['tok/s']:7.0f} tok/s busy {b['busy']:.2f} | "
                  f"streaming {s['tok/s']:7.0f} tok/s busy {s['busy']:.2f} | "
                  f"ratio {s['tok/s'] / b['tok/s']:.2f}", flush=True)  # fmt: skip
        for name, got in rows.items():
            med = {k: statistics.median(x[k] for x in got) for k in got[0]}
            print(f"{name:10} median: {med['tok/s']:7.0f} tok/s  {med['groups/s']:6.2f} groups/s  "
                  f"busy {med['busy']:.2f}")  # fmt: skip
        ratios = [
            s["tok/s"] / b["tok/s"] for b, s in zip(rows["batch"], rows["streaming"], strict=True)
        ]
        print(f"streaming / batch tokens/s, per round: {', '.join(f'{x:.2f}' for x in ratios)}; "
              f"median {statistics.median(ratios):.2f}")  # fmt: skip
        gen.close()


if __name__ == "__main__":
    main()
