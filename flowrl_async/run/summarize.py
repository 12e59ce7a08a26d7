"""``flowrl-async summarize DIR [DIR ...]``: one table and one plot over a set of runs.

Each DIR is a run directory or a folder of runs (e.g. a Hydra multirun sweep of ``train`` or
of ``simulate``, whose rows have no rewards: nan); a run is any directory with a
metrics.jsonl. The table has, per run: its overrides (from Hydra's
.hydra/overrides.yaml when present), reward, accuracy and distinct correct answers over the
last fifth of training, learner steps/s and tokens/s, mean staleness and the learner's waiting
fraction.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from flowrl_async.run.progress import read_metrics

COLUMNS = ("reward", "accuracy", "distinct", "steps/s", "tok/s", "staleness", "wait")


def find_runs(paths: list[str]) -> list[Path]:
    runs = []
    for p in map(Path, paths):
        runs += sorted({m.parent for m in p.rglob("metrics.jsonl")})
    return runs


def label(run: Path) -> str:
    overrides = run / ".hydra" / "overrides.yaml"
    if overrides.exists():
        items = [line.strip()[2:] for line in overrides.read_text().splitlines()]
        items = [i for i in items if i]
        if items:
            return " ".join(items)
    return run.name


def row(run: Path) -> dict:
    rows = read_metrics(run / "metrics.jsonl")
    tail = rows[-max(1, len(rows) // 5) :]
    step_s = sum(r["step_s"] for r in rows)
    nan = float("nan")  # a simulated run (flowrl-async simulate) has no rewards
    return {
        "run": label(run),
        "steps": len(rows),
        "reward": statistics.mean(r.get("reward_mean", nan) for r in tail),
        "accuracy": statistics.mean(r.get("accuracy", nan) for r in tail),
        "distinct": statistics.mean(r.get("distinct_correct", nan) for r in tail),
        "steps/s": len(rows) / max(step_s, 1e-9),
        "tok/s": sum(r["tokens"] for r in rows) / max(step_s, 1e-9),
        "staleness": statistics.mean(r["staleness_mean"] for r in rows),
        "wait": sum(r["wait_s"] for r in rows) / max(step_s, 1e-9),
        "history": rows,
    }


def table(rows: list[dict]) -> str:
    width = max([len("run"), *(len(r["run"]) for r in rows)])
    head = f"{'run':<{width}}  {'steps':>5}  " + "  ".join(f"{c:>9}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "  ".join(f"{r[c]:>9.3f}" if c != "tok/s" else f"{r[c]:>9.0f}" for c in COLUMNS)
        lines.append(f"{r['run']:<{width}}  {r['steps']:>5}  {cells}")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("reward_mean", "accuracy", "distinct_correct", "staleness_mean")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), constrained_layout=True)
    for r in rows:
        steps = [m["step"] for m in r["history"]]
        for ax, key in zip(axes, keys, strict=True):
            ax.plot(steps, [m.get(key, float("nan")) for m in r["history"]], lw=1, label=r["run"])
    for ax, key in zip(axes, keys, strict=True):
        ax.set_title(key)
        ax.set_xlabel("learner step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="flowrl-async summarize", description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="run directories or folders of runs")
    p.add_argument("--out", default=None, help="PNG path (default: <first path>/summary.png)")
    a = p.parse_args(argv)
    runs = find_runs(a.paths)
    if not runs:
        raise SystemExit(f"no runs (metrics.jsonl) under {a.paths}")
    rows = [row(r) for r in runs]
    print(table(rows))
    out = Path(a.out) if a.out else Path(a.paths[0]) / "summary.png"
    print(f"\nplot: {plot(rows, out)}")
