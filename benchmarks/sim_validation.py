"""The simulator against the real system: runs of the main job at several staleness bounds,
the cost model calibrated from one of them, the others predicted.

Each real run is ``flowrl-async train`` (Ray, replay service, learner, vLLM actors) with
``replay.max_staleness=K`` and ``--steps`` learner steps, kept in ``--dir`` (a run whose
summary.json exists is not run again: the command resumes an interrupted validation).
The costs are fitted from the run at ``--calibrate-from`` (``flowrl-async simulate
calibrate``); every run's config is then simulated with them. Printed side by side:
learner steps/s (steps over the learner's summed step times) and mean staleness of trained
groups, measured and predicted, with the relative error.

Run: .venv/bin/python benchmarks/sim_validation.py [--staleness 0 1 4] [--steps 100]
     [--calibrate-from 1] [--dir runs/sim_validation] [-- extra train overrides]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def train(run: Path, staleness: int, steps: int, extra: list[str]) -> None:
    if (run / "summary.json").exists():
        return
    cmd = [sys.executable, "-m", "flowrl_async", "train", f"run_dir={run}",
           f"replay.max_staleness={staleness}", f"learner.steps={steps}", *extra]  # fmt: skip
    print("running:", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def measured(run: Path) -> tuple[float, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    return len(rows) / sum(r["step_s"] for r in rows), statistics.mean(
        r["staleness_mean"] for r in rows
    )


def predicted(run: Path, costs) -> tuple[float, float]:
    from omegaconf import OmegaConf

    from flowrl_async.config import TrainConfig
    from flowrl_async.run import resume
    from flowrl_async.run.sim.run import simulate

    saved = OmegaConf.merge(OmegaConf.structured(TrainConfig), resume.saved_config(run))
    cfg: TrainConfig = OmegaConf.to_object(saved)
    _, s = simulate(cfg, costs)
    return s["steps_per_s"], s["staleness_mean"]


def error(got: float, want: float) -> str:
    if want == 0:  # a relative error has no meaning: the same figure or not
        return "exact" if got == 0 else "differs"
    return f"{100 * (got - want) / want:+.1f}%"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 4])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--calibrate-from", type=int, default=1)
    p.add_argument("--dir", default="runs/sim_validation")
    p.add_argument("extra", nargs="*", help="more train overrides (after --)")
    a = p.parse_args(argv)

    from flowrl_async.run.sim.calibrate import calibrate
    from flowrl_async.run.sim.costs import save_costs

    root = Path(a.dir)
    runs = {k: root / f"staleness-{k}" for k in a.staleness}
    for k, run in runs.items():
        train(run, k, a.steps, a.extra)
    costs = calibrate(runs[a.calibrate_from])
    print(f"costs: {save_costs(costs, root / 'costs.json')}")
    print(
        "| max_staleness | steps/s measured | predicted | error | staleness measured | "
        "predicted | error |"
    )
    print("|---|---|---|---|---|---|---|")
    for k, run in runs.items():
        (sps, stale), (psps, pstale) = measured(run), predicted(run, costs)
        mark = " (calibrated here)" if k == a.calibrate_from else ""
        print(
            f"| {k}{mark} | {sps:.3f} | {psps:.3f} | {error(psps, sps)} | {stale:.3f} | "
            f"{pstale:.3f} | {error(pstale, stale)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
