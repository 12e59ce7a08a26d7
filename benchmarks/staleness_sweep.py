"""Importance weights under staleness: the paper's FlowRL at max_staleness 0 / 2 / 4 / 8 with
the sequence IS weight clipped, masked (IcePop-style: ratios outside [0.5, 2] get weight 0)
or off (weight 1), at a learning rate where policies move (3e-4), same steps and seeds.

Per run it keeps a small JSON record (``--records``, in the repository:
docs/evidence/staleness/<task>-lr<lr>/): the trained groups' mean staleness, the IS weight mean, the
effective sample size of the raw weights (mean and the worst step), the clipped and masked
fractions, learner steps/s and waiting share, whether the run collapsed, and the final
policy's figures (``--samples`` per train and held-out prompt at T = 1). Staleness 0 runs
once, with the first of ``--is-modes``: with no stale data every mode weighs 1. Finished records are skipped; an
unfinished run starts over; ``--report`` prints the table from the records alone.

Collapse: the batch reward's mean over the last 20 steps is below half the best 20-step mean
the run reached (a policy that lost what it learned).

    .venv/bin/python benchmarks/staleness_sweep.py --steps 250 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
from pathlib import Path

from flowrl_vs_grpo import ROOT, _rounded, cell, config, evaluate_records, markdown, settings_id

from flowrl_async.run import evidence
from flowrl_async.run.launch import train
from flowrl_async.run.progress import read_metrics

WINDOW = 20


def collapsed(rewards: list[float], window: int = WINDOW) -> bool:
    """The last ``window`` steps' mean reward is below half the best ``window``-step mean."""
    if len(rewards) < 2 * window:
        return False
    means = [statistics.fmean(rewards[i : i + window]) for i in range(len(rewards) - window + 1)]
    return means[-1] < 0.5 * max(means)


def settings(staleness: list[int], modes: list[str]) -> list[tuple[int, str]]:
    return [(s, m) for s in staleness for m in (modes[:1] if s == 0 else modes)]


def run_one(task: str, staleness: int, mode: str, seed: int, a) -> dict:
    name = f"s{staleness}-{mode}-seed{seed}"
    run_dir = Path(a.out).resolve() / f"{task}-lr{a.lr:g}" / name
    cfg = config(task, "flowrl", seed, a.steps, run_dir)
    cfg.learner.lr, cfg.replay.max_staleness, cfg.algo.is_mode = a.lr, staleness, mode
    cfg.evaluation.every = 0  # no pauses of actor 1: the throughput figures are the run's own
    sid = settings_id(cfg, samples=a.samples)
    path = Path(a.records) / f"{task}-lr{a.lr:g}" / f"{name}.json"
    if path.exists():
        record = json.loads(path.read_text())
        if record.get("settings") != sid:
            raise SystemExit(f"{path} was made with other settings: give another --records")
        return record
    marker = run_dir / "bench_settings"
    if not ((run_dir / "final_policy").exists() and marker.exists()
            and marker.read_text() == sid):  # fmt: skip
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        marker.write_text(sid)
        train(cfg)
    rows = read_metrics(run_dir / "metrics.jsonl")
    rewards = [r["reward_mean"] for r in rows]
    ev, _ = evaluate_records(cfg, a.samples, temperatures=(1.0,))
    windows = [statistics.fmean(rewards[i : i + WINDOW])
               for i in range(max(len(rewards) - WINDOW + 1, 1))]  # fmt: skip
    record = {
        "task": task, "staleness": staleness, "is_mode": mode, "seed": seed, "lr": a.lr,
        "settings": sid,
        "steps": a.steps,
        "stale": statistics.fmean(r["staleness_mean"] for r in rows),
        "is_mean": statistics.fmean(r["is_weight_mean"] for r in rows),
        "ess": statistics.fmean(r["is_ess"] for r in rows),
        "ess_min": min(r["is_ess"] for r in rows),
        "clipped": statistics.fmean(r["is_clip_fraction"] for r in rows),
        "masked": statistics.fmean(r.get("is_masked_fraction", 0.0) for r in rows),
        "steps_s": (len(rows) - 1) / (rows[-1]["time"] - rows[0]["time"]),
        "wait": sum(r["wait_s"] for r in rows) / sum(r["step_s"] for r in rows),
        "collapsed": collapsed(rewards),
        "reward_last": statistics.fmean(rewards[-WINDOW:]),
        "reward_best": max(windows),
        "final": {split: evidence.run_figures(ev[f"{split} T=1.0"], (1, a.samples))
                  for split in ("train", "eval")},
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_rounded(record), indent=1))
    tmp.replace(path)
    return record


COLUMNS = ("stale", "is_mean", "ess", "ess_min", "clipped", "masked", "steps_s", "wait")


def report(folder: Path, figure: Path | None = None) -> None:
    groups: dict[tuple, list[dict]] = {}
    for path in sorted(folder.glob("s*-seed*.json")):
        r = json.loads(path.read_text())
        groups.setdefault((r["staleness"], r["is_mode"]), []).append(r)
    if not groups:
        raise SystemExit(f"no records in {folder}")
    rows = []
    for (staleness, mode), recs in sorted(groups.items()):
        acc = [r["final"]["train"]["pass@1"] for r in recs]
        held = [r["final"]["eval"]["pass@1"] for r in recs]
        distinct = [r["final"]["train"]["distinct"] for r in recs]
        rows.append((f"{staleness}", mode, len(recs),
                     *(cell([_num(r[c]) for r in recs]) for c in COLUMNS),
                     f"{sum(r['collapsed'] for r in recs)}/{len(recs)}",
                     cell(acc), cell(held), cell(distinct)))  # fmt: skip
    print(markdown(("max staleness", "IS", "seeds", *COLUMNS, "collapsed", "final accuracy",
                    "held-out accuracy", "distinct"), rows))  # fmt: skip
    if figure is not None:
        plot(groups, figure)
        print(f"\nfigure: {figure}")


def plot(groups: dict[tuple, list[dict]], path: Path) -> None:
    """Final accuracy, worst-step ESS and collapses against max staleness, a line per IS
    mode (staleness 0 runs once: every mode weighs 1 there, so each line starts at it);
    error bars: 95% t-intervals over the seeds (none on the collapse share: a count). The
    lines are shifted apart a little along x so that their bars do not hide each other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("final train accuracy (pass@1)", lambda r: r["final"]["train"]["pass@1"], True),
              ("ESS of the worst step (share of the batch)", lambda r: _num(r["ess_min"]), True),
              ("collapsed runs (share)", lambda r: float(r["collapsed"]), False))  # fmt: skip
    modes = sorted({m for s, m in groups if s > 0})
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4.4))
    for ax, (title, value, bars) in zip(axes, panels, strict=True):
        for i, mode in enumerate(modes):
            keys = sorted(k for k in groups if k[1] == mode or k[0] == 0)
            xs, means, errs = [], [], []
            for key in keys:
                stats = evidence.interval([value(r) for r in groups[key]])
                xs.append(key[0] + 0.08 * (i - (len(modes) - 1) / 2))
                means.append(stats["mean"])
                errs.append(0.0 if math.isnan(stats["ci95"]) or not bars else stats["ci95"])
            ax.errorbar(xs, means, yerr=errs, marker="o", capsize=3, label=f"IS {mode}")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("max staleness (versions)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _num(x) -> float:
    return math.nan if x is None else float(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits", choices=("digits", "sums"))
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--staleness", type=int, nargs="+", default=[0, 2, 4, 8])
    p.add_argument("--is-modes", nargs="+", default=["clip", "mask", "off"])
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--out", default="bench-out/staleness")
    p.add_argument("--records", default=str(ROOT / "docs/evidence/staleness"))
    p.add_argument("--report", action="store_true", help="the table from the records only")
    p.add_argument(
        "--figure",
        default=None,
        help="PNG path (default docs/evidence_staleness_<task>-lr<lr>.png)",
    )
    a = p.parse_args()
    if not a.report:
        for seed in a.seeds:
            for staleness, mode in settings(a.staleness, a.is_modes):
                run_one(a.task, staleness, mode, seed, a)
    print(f"\nFlowRL (paper) on {a.task}, lr {a.lr}: mean ± std [95% interval] over seeds\n")
    figure = Path(a.figure or ROOT / f"docs/evidence_staleness_{a.task}-lr{a.lr:g}.png")
    report(Path(a.records) / f"{a.task}-lr{a.lr:g}", figure)


if __name__ == "__main__":
    main()
