"""Async vs sync on the same machine in one run: the same number of trained groups in
mode=sync (generate, then train, then publish) and in async mode (actors never pause).

Prints the measured speedup (sync wall / async wall), the ideal speedup
(gen + train) / max(gen, train) from the sync run's measured phase times, async / ideal, and
the learner's utilisation (time spent training / wall time) in each mode.

    .venv/bin/python benchmarks/async_vs_sync.py --steps 60
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from flowrl_async.config import TrainConfig
from flowrl_async.run.launch import train
from flowrl_async.run.progress import read_metrics


def run(mode: str, steps: int, root: Path, engine: str, staleness: int) -> dict:
    cfg = TrainConfig(run_dir=str(root / mode), mode=mode)
    cfg.learner.steps = steps
    cfg.learner.checkpoint_every = 10**6
    cfg.model.warm_start_steps = 40
    cfg.generator.engine = engine
    cfg.replay.max_staleness = staleness
    cfg.task.kwargs = {"lengths": [2], "min_solutions": 5, "partial_credit": 0.5}
    train(cfg)
    rows = read_metrics(root / mode / "metrics.jsonl")[1:]  # the first step includes warm-up
    wall = rows[-1]["time"] - rows[0]["time"]
    train_s = [r["step_s"] - r["wait_s"] for r in rows]
    return {
        "wall_per_step": wall / (len(rows) - 1),
        "train_s": statistics.median(train_s),
        "generate_s": statistics.median(r.get("generate_s", 0.0) for r in rows),
        "utilisation": sum(train_s[1:]) / wall,
        "accuracy_last": statistics.mean(r["accuracy"] for r in rows[-10:]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--engine", default="vllm")
    p.add_argument("--max-staleness", type=int, default=1)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sync = run("sync", a.steps, Path(tmp), a.engine, a.max_staleness)
        asyn = run("async", a.steps, Path(tmp), a.engine, a.max_staleness)
    gen, trn = sync["generate_s"], sync["train_s"]
    ideal = (gen + trn) / max(gen, trn)
    speedup = sync["wall_per_step"] / asyn["wall_per_step"]
    print(f"\nsteps {a.steps}, engine {a.engine}, async max_staleness {a.max_staleness}")
    print(f"sync phases (median): generate {gen:.3f} s, train {trn:.3f} s")
    print(f"wall per step: sync {sync['wall_per_step']:.3f} s, async {asyn['wall_per_step']:.3f} s")
    print(
        f"speedup async/sync {speedup:.2f}x; ideal {ideal:.2f}x; async/ideal {speedup / ideal:.2f}"
    )
    print(f"learner utilisation: sync {sync['utilisation']:.2f}, async {asyn['utilisation']:.2f}")
    print(
        f"accuracy (last 10 steps): sync {sync['accuracy_last']:.3f}, async {asyn['accuracy_last']:.3f}"
    )


if __name__ == "__main__":
    main()
