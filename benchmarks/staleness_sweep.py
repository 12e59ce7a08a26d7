"""Staleness sweep: the paper's FlowRL at max_staleness 0, 1 and 4, with importance weights
on (clipped, the default) and off (weight 1), same steps, batch and seeds.

For each setting it prints the trained groups' mean staleness, the IS weight mean and
effective sample size, the clip fraction, learner steps per second and the share of step
time spent waiting for data, reward and accuracy over the last fifth of training, and the
final policy's accuracy and distinct correct answers on the training prompts (64 samples,
T = 1.0). Mean ± std over seeds.

    .venv/bin/python benchmarks/staleness_sweep.py --steps 300 --seeds 0 1 --out bench-out/stale
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from _common import table
from flowrl_vs_grpo import TASK, evaluate_policy, mean_std

from flowrl_async.config import TrainConfig
from flowrl_async.run.launch import train
from flowrl_async.run.progress import read_metrics

COLUMNS = ("stale", "IS mean", "ESS", "clipped", "steps/s", "wait", "reward", "acc",
           "eval acc", "distinct")  # fmt: skip


def config(staleness: int, is_mode: str, seed: int, steps: int, run_dir: Path,
           lr: float) -> TrainConfig:  # fmt: skip
    cfg = TrainConfig(run_dir=str(run_dir), seed=seed)
    cfg.learner.lr = lr
    cfg.task.kwargs = dict(TASK)
    cfg.learner.steps, cfg.learner.checkpoint_every = steps, 10**6
    cfg.replay.max_staleness, cfg.algo.is_mode = staleness, is_mode
    return cfg


def measure(run_dir: Path, evaluation: dict) -> dict[str, float]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    tail = rows[-max(len(rows) // 5, 1) :]
    wall = rows[-1]["time"] - rows[0]["time"]
    return {
        "stale": statistics.mean(r["staleness_mean"] for r in rows),
        "IS mean": statistics.mean(r["is_weight_mean"] for r in rows),
        "ESS": statistics.mean(r["is_ess"] for r in rows),
        "clipped": statistics.mean(r["is_clip_fraction"] for r in rows),
        "steps/s": (len(rows) - 1) / wall,
        "wait": sum(r["wait_s"] for r in rows) / sum(r["step_s"] for r in rows),
        "reward": statistics.mean(r["reward_mean"] for r in tail),
        "acc": statistics.mean(r["accuracy"] for r in tail),
        "eval acc": evaluation["train"]["accuracy"],
        "distinct": evaluation["train"]["distinct_correct"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 4])
    p.add_argument("--is-modes", nargs="+", default=["clip", "off"])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--lr", type=float, default=TrainConfig().learner.lr)
    p.add_argument("--out", default="bench-out/staleness_sweep")
    a = p.parse_args()
    out = Path(a.out).resolve()
    results: dict[str, list[dict]] = {}
    for seed in a.seeds:
        for staleness in a.staleness:
            for is_mode in a.is_modes:
                run_dir = out / f"s{staleness}-{is_mode}-seed{seed}"
                if not (run_dir / "eval-train" / "eval.json").exists():  # resumable (T=1.0)
                    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts over
                    train(config(staleness, is_mode, seed, a.steps, run_dir, a.lr))
                    evaluate_policy(run_dir, a.samples, seed)
                ev = {s: json.loads((run_dir / f"eval-{s}" / "eval.json").read_text())
                      for s in ("train", "eval")}  # fmt: skip
                key = f"staleness {staleness}, IS {is_mode}"
                results.setdefault(key, []).append(measure(run_dir, ev))
    rows = [(key, *(mean_std([r[c] for r in runs]) for c in COLUMNS))
            for key, runs in results.items()]  # fmt: skip
    print(f"\nFlowRL (paper), {a.steps} steps, lr {a.lr}, seeds {a.seeds}; mean ± std over seeds")
    print(table(("setting", *COLUMNS), rows, (24, *[15] * len(COLUMNS))))
    (out / "results.json").write_text(json.dumps({"args": vars(a), "results": results}, indent=2))
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
