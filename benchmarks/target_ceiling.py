"""The accuracy at convergence of each trajectory-balance objective, before any training.

An objective that converges to π ∝ π_ref·exp(β r) (the sum forms, VarGrad) puts
e^β·Z_valid / (e^β·Z_valid + Z_rest) of its mass on correct answers (Z: π_ref's mass,
weighted by exp(β r) outside the valid set); the mean form's optimum π_ref·exp(|y|(β r − c))
tilts by length as well. With π_ref the format warm-started built-in model (the π_ref of
every run of benchmarks/flowrl_vs_grpo.py with that seed), this prints that share, averaged
over the training prompts, for each form and β: the pass@1 a run of that objective has once
it reaches its target (a run on its way there may pass it), the mean correct-answer
length there, and the distinct correct answers expected among 64 of its samples: how much
diversity each objective keeps if it converges, against what a run measures.

    .venv/bin/python benchmarks/target_ceiling.py --tasks digits sums --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from flowrl_vs_grpo import REF_DRAWS, config, markdown

from flowrl_async.run.launch import prepare_model

BETAS = (1.0, 3.0, 5.0, 9.0, 15.0)


def ceilings(task_name: str, seed: int, betas, out: Path) -> dict[tuple[str, float], tuple]:
    """(form, β) -> (share on the valid set, mean correct length, expected distinct correct
    answers in 64 samples), each averaged over the train prompts."""
    from flowrl_async.model import load_policy, load_tokenizer
    from flowrl_async.run.evaluate import reference_draws
    from flowrl_async.run.evidence import expected_distinct
    from flowrl_async.tasks import load_task
    from flowrl_async.tasks.target import Reference, reference_report

    run_dir = out / f"{task_name}-seed{seed}"
    cfg = config(task_name, "flowrl", seed, 1, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ref_dir = Path(prepare_model(cfg, run_dir))
    model, tok = load_policy(ref_dir), load_tokenizer(ref_dir)
    task = load_task(cfg.task.target, **cfg.task.kwargs)
    draw = reference_draws(model, tok, REF_DRAWS, 1.0, cfg.generator.max_tokens)
    cache = {}

    def draw_once(ids):  # one set of π_ref's draws per prompt for every form and β
        if tuple(ids) not in cache:
            cache[tuple(ids)] = draw(ids)
        return cache[tuple(ids)]

    out_rows = {}
    for form in ("sum", "mean"):
        for beta in betas:
            ref = Reference(model, tok, form, beta, 1.0, draw_once)
            reports = [reference_report(ref, task, p, task.valid_set(p))
                       for p in task.train_prompts]  # fmt: skip
            out_rows[form, beta] = (
                statistics.fmean(r["own_mass"] for r in reports),
                statistics.fmean(sum(p * n for p, n in zip(r["own"], r["lengths"], strict=True))
                                 for r in reports),
                statistics.fmean(expected_distinct([r["own_mass"] * p for p in r["own"]], 64)
                                 for r in reports),
            )  # fmt: skip
    return out_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["digits", "sums"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--betas", type=float, nargs="+", default=list(BETAS))
    p.add_argument("--out", default="bench-out/target_ceiling")
    a = p.parse_args()
    for task in a.tasks:
        per_seed = [ceilings(task, s, a.betas, Path(a.out).resolve()) for s in a.seeds]
        rows = []
        for key in per_seed[0]:
            mass = [r[key][0] for r in per_seed]
            length = [r[key][1] for r in per_seed]
            distinct = [r[key][2] for r in per_seed]
            rows.append((key[0], f"{key[1]:g}", f"{statistics.fmean(mass):.3f}",
                         f"{min(mass):.3f} – {max(mass):.3f}",
                         f"{statistics.fmean(length):.2f}",
                         f"{statistics.fmean(distinct):.2f}"))  # fmt: skip
        print(f"\n{task}: the optimum's accuracy (share on the valid set), train prompts, "
              f"π_ref of seeds {a.seeds}\n")  # fmt: skip
        print(markdown(("form", "β", "optimum's accuracy", "range over seeds",
                        "mean correct length (tokens)", "distinct correct in 64"),
                       rows))  # fmt: skip


if __name__ == "__main__":
    main()
