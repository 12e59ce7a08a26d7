"""``flowrl-async simulate``: the run a config describes, simulated (``model.py``), with its
cost model from a cost file (``sim.costs``); writes metrics.jsonl (one row per learner step,
as a real run's, so ``flowrl-async summarize`` reads sweeps of both), summary.json and
sim.png into ``run_dir``.
"""

from __future__ import annotations

import json
from pathlib import Path

from flowrl_async.config import TrainConfig
from flowrl_async.run.sim.costs import Costs, load_costs
from flowrl_async.run.sim.model import Shape, Simulation


def shape_of(cfg: TrainConfig) -> Shape:
    from flowrl_async.run.driver import sync_batches_per_actor

    g, lc = cfg.generator, cfg.learner
    return Shape(
        actors=cfg.cluster.num_actors, ranks=lc.world_size, n=g.n, batch_groups=lc.batch_groups,
        publish_every=lc.publish_every, streaming=g.streaming and cfg.mode == "async",
        max_in_flight=g.max_in_flight, groups_per_batch=g.groups_per_batch,
        inflight_updates=g.inflight_updates, inflight_kv=g.inflight_kv, sync=cfg.mode == "sync",
        sync_batches=sync_batches_per_actor(cfg) if cfg.mode == "sync" else 1,
    )  # fmt: skip


def simulate(cfg: TrainConfig, costs: Costs, steps: int | None = None, seed: int | None = None):
    """-> (Outcome, summary dict) of the run ``cfg`` describes under ``costs``."""
    from flowrl_async.config import validate
    from flowrl_async.run.processes import replay_config

    validate(cfg)  # what train refuses, simulate refuses
    replay = replay_config(cfg, Path(cfg.run_dir), "sim://")
    sim = Simulation(shape_of(cfg), costs, replay, seed=cfg.seed if seed is None else seed)
    out = sim.run(cfg.learner.steps if steps is None else steps)
    return out, out.summary(cfg.cluster.num_actors)


def main(cfg: TrainConfig) -> dict:
    costs = load_costs(cost_file(cfg.sim.costs)) if cfg.sim.costs else Costs()
    out, summary = simulate(cfg, costs, seed=cfg.sim.seed)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    with (run / "metrics.jsonl").open("w") as f:
        for row in out.rows:
            f.write(json.dumps(row) + "\n")
    summary["costs"] = costs.source
    (run / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(table(summary))
    print(f"figure: {plot(out, run / 'sim.png')}")
    if out.steps < cfg.learner.steps:
        print(f"stopped after {out.steps} of {cfg.learner.steps} steps: nothing could move "
              "(every actor and the learner waiting)")  # fmt: skip
    return summary


def cost_file(path: str) -> Path:
    """``path`` as given, or within the repository (``sim=h100_7b`` names docs/sim/...)."""
    given = Path(path)
    inside = Path(__file__).resolve().parents[3] / path
    return given if given.exists() or given.is_absolute() or not inside.exists() else inside


def table(s: dict) -> str:
    """The summary as printed: one figure a line (model output, not a measurement)."""
    items = list(s["staleness_hist"].items())
    hist = ", ".join(f"{k}: {v}" for k, v in items[:12]) + (", ..." if len(items) > 12 else "")
    return "\n".join([
        f"simulated {s['steps']} learner steps in {s['time_s']:.1f} s (model output)",
        f"  learner steps/s      {s['steps_per_s']:.3f}",
        f"  learner idle share   {s['learner_idle']:.3f}",
        f"  actor idle share     {s['actor_idle']:.3f}",
        f"  staleness mean       {s['staleness_mean']:.3f}   (trained groups: {hist})",
        f"  stale evictions      {s['evicted_stale']}",
        f"  generated tokens/s   {s['tokens_per_s']:.0f}",
    ])  # fmt: skip


def plot(out, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), constrained_layout=True)
    t = [r["time_s"] for r in out.rows]
    axes[0].plot(t, [r["step"] for r in out.rows], lw=1)
    axes[0].set(title="learner steps", xlabel="simulated s")
    axes[1].plot([x for x, _ in out.occupancy], [y for _, y in out.occupancy], lw=1)
    axes[1].set(title="groups held", xlabel="simulated s")
    hist: dict[int, int] = {}
    for s in out.staleness:
        hist[s] = hist.get(s, 0) + 1
    axes[2].bar(list(hist), list(hist.values()))
    axes[2].set(title="staleness of trained groups", xlabel="versions")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
