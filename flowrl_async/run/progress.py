"""What a run shows and leaves behind: metrics.jsonl, TensorBoard events, a live progress
line, the curves as a PNG, and the summary table."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

CURVES = ("reward_mean", "accuracy", "distinct_correct", "loss", "entropy", "staleness_mean",
          "eval_accuracy", "eval_distinct_correct", "eval_coverage")  # fmt: skip
EVAL_FIGURES = ("accuracy", "distinct_correct", "coverage")  # periodic evaluation (eval_*)


class MetricsLog:
    """metrics.jsonl, TensorBoard and the live progress line of one run."""

    def __init__(self, run_dir: Path, total_steps: int):
        self.run_dir, self.total = run_dir, total_steps
        path = run_dir / "metrics.jsonl"
        torn = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
        self.file = open(path, "a")  # noqa: SIM115 - closed in close()
        if torn:  # a crash left half a line: the next row starts a line of its own
            self.file.write("\n")
        self.started = time.time()
        self.history: list[dict] = []
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional at run time
            self.tb = None

    def add(self, m: dict) -> None:
        m["time"] = time.time() - self.started
        self.history.append(m)
        self.file.write(json.dumps(m) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in m.items():
                if isinstance(v, int | float):
                    self.tb.add_scalar(k, v, int(m["step"]))
        self.show(m)

    def show(self, m: dict) -> None:
        line = (
            f"step {int(m['step']):>4}/{self.total}  v{int(m['version'])}  "
            f"reward {m['reward_mean']:.3f}  acc {m['accuracy']:.3f}  "
            f"distinct {m['distinct_correct']:.2f}  stale {m['staleness_mean']:.2f}  "
            f"tok/s {m['tokens'] / max(m['step_s'], 1e-9):,.0f}  wait {m['wait_s']:.2f}s"
        )
        if sys.stdout.isatty():
            print("\r" + line + " " * 4, end="", flush=True)
        elif int(m["step"]) % 10 == 0 or int(m["step"]) == self.total:
            print(line, flush=True)

    def close(self) -> None:
        if sys.stdout.isatty() and self.history:
            print()
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line a crash left torn (or glued to the next one by a
    resumed run's appends) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in rows if isinstance(r, dict)]


def plot_curves(rows: list[dict], out: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(12, 9), constrained_layout=True)
    for ax, key in zip(axes.flat, CURVES, strict=True):  # eval_*: the steps that evaluated
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1,
                marker="." if key.startswith("eval_") else None)  # fmt: skip
        ax.set_title(key)
        ax.set_xlabel("learner step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def summarize(history: list[dict]) -> dict:
    if not history:
        return {}
    k = max(1, len(history) // 5)
    first, last = history[:k], history[-k:]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    evals = [r for r in history if "eval_accuracy" in r]
    figures = {}  # the first and the last periodic evaluation (coverage: enumerable tasks)
    for end, row in (("first", evals[0]), ("last", evals[-1])) if evals else ():
        figures.update({f"eval_{key}_{end}": row[f"eval_{key}"] for key in EVAL_FIGURES
                        if f"eval_{key}" in row})  # fmt: skip
    return {
        **figures,
        "reward_first": mean(first, "reward_mean"),
        "reward_last": mean(last, "reward_mean"),
        "accuracy_first": mean(first, "accuracy"),
        "accuracy_last": mean(last, "accuracy"),
        "distinct_correct_first": mean(first, "distinct_correct"),
        "distinct_correct_last": mean(last, "distinct_correct"),
        "wall_s": history[-1]["time"],
        "learner_wait_fraction": sum(r["wait_s"] for r in history)
        / max(sum(r["step_s"] for r in history), 1e-9),
    }


def print_summary(s: dict) -> None:
    rows = [
        ("steps", f"{s['steps']}"),
        ("wall time", f"{s.get('wall_s', 0):.0f} s"),
        (
            "reward (first → last fifth)",
            f"{s.get('reward_first', 0):.3f} → {s.get('reward_last', 0):.3f}",
        ),
        ("accuracy", f"{s.get('accuracy_first', 0):.3f} → {s.get('accuracy_last', 0):.3f}"),
        (
            "distinct correct / group",
            f"{s.get('distinct_correct_first', 0):.2f} → {s.get('distinct_correct_last', 0):.2f}",
        ),
        *[
            (
                f"evaluation: {label} (first → last)",
                f"{s[f'eval_{key}_first']:.3f} → {s[f'eval_{key}_last']:.3f}",
            )
            for key, label in (
                ("accuracy", "accuracy"),
                ("distinct_correct", "distinct correct / prompt"),
                ("coverage", "coverage of the valid set"),
            )
            if f"eval_{key}_first" in s and f"eval_{key}_last" in s
        ],  # fmt: skip
        (
            "learner waiting for data",
            f"{100 * s.get('learner_wait_fraction', 0):.0f}% of step time",
        ),
        ("actor restarts", f"{s.get('actor_restarts', 0)}"),
        ("run dir", s["run_dir"]),
        ("final policy", s["final_policy"]),
        ("curves", s.get("curves", "")),
    ]
    for a in s.get("actors", []):
        if "unavailable" in a:
            rows.append((f"actor {a['actor']}", f"unavailable at the end: {a['unavailable']}"))
    if "unavailable" in s.get("replay", {}):
        rows.append(("replay service", f"unavailable at the end: {s['replay']['unavailable']}"))
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
