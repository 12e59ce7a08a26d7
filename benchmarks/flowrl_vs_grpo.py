"""FlowRL against GRPO on the real system: accuracy and diversity at the same budget.

Three variants, each trained by the main job (Ray, replay service, learner, vLLM actors) with
the same model, warm-start, task, steps × batch (= trained groups) and seeds:

    grpo            algo=grpo, FIFO replay, max_staleness 1
    flowrl          the paper: group-normalised reward, β = 15, clipped IS, FIFO, staleness 1
    flowrl_replay   off-policy trajectory balance: raw reward, β = 3, IS weight 1, batches of
                    fresh groups plus groups replayed uniformly from the buffer, no staleness bound
    flowrl_tb_fresh the ablation: the same objective on fresh groups only (FIFO, each once)
    flowrl_replay_sol  flowrl_replay with the sum_over_len residual (target π_ref·exp(β r))
    flowrl_replay_sol_b9  the same at β = 9: flowrl_replay's target here (see below)
    vargrad_replay  VarGrad (configs/algo/vargrad.yaml: log Z the group's mean residual, no
                    head, sum_over_len, β = 3) with flowrl_replay's replay

On this task every answer has one length L (2 digits + <eos>), so the mean form at β is the
sum form at L·β: flowrl_replay targets π_ref·exp(3·3·r), the sum_over_len variants
π_ref·exp(3·r) (a weaker tilt toward full reward); on the valid set (every answer full
reward, one length) all targets are π_ref renormalised.

Each final policy is evaluated with ``--samples`` completions per prompt at T = 1.0 and 0.6
(as in the paper) on the training prompts (diversity of what the policy learned) and on
held-out prompts. Prints one
table (mean ± std over seeds) and writes ``results.json`` and ``flowrl_vs_grpo.png`` (eval
accuracy and distinct correct answers over training; the answer histogram on one prompt
against the target distribution π_ref restricted to the valid set, and uniform).

    .venv/bin/python benchmarks/flowrl_vs_grpo.py --steps 400 --seeds 0 1 2 --out bench-out/fvg
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from collections import Counter
from pathlib import Path

import _common  # noqa: F401 - one thread per process, before torch
from omegaconf import OmegaConf

from flowrl_async.config import TrainConfig
from flowrl_async.learner.config import AlgoConfig
from flowrl_async.run.launch import train
from flowrl_async.run.progress import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TASK = {"lengths": [2], "min_solutions": 5, "partial_credit": 0.5}
VARIANTS = (
    "grpo",
    "flowrl",
    "flowrl_replay",
    "flowrl_tb_fresh",
    "flowrl_replay_sol",
    "flowrl_replay_sol_b9",
    "vargrad_replay",
)
TEMPERATURES = (1.0, 0.6)  # the paper evaluates at both
COLUMNS = (
    "accuracy",
    "distinct_correct",
    "coverage",
    "tv_to_target",
    "tv_to_uniform",
    "entropy",
)  # fmt: skip  (and pass@k, k = --samples)


def algo(name: str) -> AlgoConfig:
    return AlgoConfig(**OmegaConf.to_container(OmegaConf.load(ROOT / f"configs/algo/{name}.yaml")))


def config(variant: str, seed: int, steps: int, run_dir: Path, every: int) -> TrainConfig:
    cfg = TrainConfig(run_dir=str(run_dir), seed=seed)
    cfg.task.kwargs = dict(TASK)
    cfg.learner.steps = steps
    cfg.learner.checkpoint_every = 10**6  # the final policy is all this benchmark needs
    cfg.evaluation.every, cfg.evaluation.split, cfg.evaluation.samples = every, "train", 16
    if variant == "grpo":
        cfg.algo = algo("grpo")
    elif variant == "flowrl":
        cfg.algo = algo("flowrl")
    elif variant in ("flowrl_replay", "flowrl_replay_sol", "flowrl_replay_sol_b9",
                     "vargrad_replay"):  # fmt: skip
        cfg.algo = algo("vargrad" if variant == "vargrad_replay" else "flowrl_tb")
        if variant.startswith("flowrl_replay_sol"):
            cfg.algo.residual = "sum_over_len"
        if variant == "flowrl_replay_sol_b9":  # flowrl_replay's target on this task
            cfg.algo.beta = 9.0
        r = cfg.replay
        r.selector, r.fresh_fraction, r.max_times_sampled, r.max_staleness = "mixed", 0.5, 8, None
    elif variant == "flowrl_tb_fresh":  # the ablation: the same objective, no replay
        cfg.algo = algo("flowrl_tb")
        cfg.replay.max_staleness = None
    else:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return cfg


def eval_dir(run_dir: Path, split: str, temperature: float) -> Path:
    return run_dir / (f"eval-{split}" if temperature == 1.0 else f"eval-{split}-T{temperature}")


def evaluate_policy(run_dir: Path, samples: int, seed: int, temperature: float = 1.0) -> dict:
    """eval.json-style results on the train and the held-out prompts (torch sampler)."""
    from flowrl_async.actors.generator import build_generator
    from flowrl_async.model import load_tokenizer
    from flowrl_async.run.evaluate import evaluate
    from flowrl_async.tasks.digits import DigitSumTask

    policy = run_dir / "final_policy"
    task = DigitSumTask(**TASK)
    gen = build_generator("torch", str(policy), seed, 256, "float32")
    tok = load_tokenizer(policy)
    return {
        split: evaluate(
            gen,
            tok,
            task,
            prompts,
            samples,
            temperature,
            8,
            eval_dir(run_dir, split, temperature),
            seed,
        )  # fmt: skip
        for split, prompts in (("train", task.train_prompts), ("eval", task.eval_prompts))
    }


def tv_to_target(run_dir: Path, eval_path: Path) -> float:
    """Mean over prompts of the TV distance between the sampled correct answers and FlowRL's
    target on the valid set (π_ref restricted to it; 1.0 for a prompt with no correct
    sample), from an evaluation's samples.jsonl. Cached beside it."""
    cache = eval_path / "tv_to_target.json"
    if cache.exists():
        return json.loads(cache.read_text())["tv_to_target"]
    from flowrl_async.model import load_policy, load_tokenizer
    from flowrl_async.tasks.digits import DigitSumTask
    from flowrl_async.tasks.scoring import distribution_metrics
    from flowrl_async.tasks.target import Reference, reference_target

    task, ref = DigitSumTask(**TASK), run_dir / "init_model"
    reference = Reference(load_policy(ref), load_tokenizer(ref))  # sum form: π_ref on valid
    samples = [json.loads(line) for line in (eval_path / "samples.jsonl").open()]
    distances = []
    for pid in sorted({s["prompt_id"] for s in samples}):
        prompt = task.prompt(pid)
        valid = task.valid_set(prompt)
        answers = [s["completion"].strip() for s in samples
                   if s["prompt_id"] == pid and s["info"] == "ok"]  # fmt: skip
        target = reference_target(reference, task, prompt, valid)
        distances.append(distribution_metrics(answers, valid, target)["tv_to_target"])
    value = sum(distances) / len(distances)
    cache.write_text(json.dumps({"tv_to_target": value}))
    return value


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def plot(results: dict, out: Path, hist: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for variant, runs in results.items():
        for key, ax in (("eval_accuracy", axes[0]), ("eval_distinct_correct", axes[1])):
            curves = [[(r["step"], r[key]) for r in run["metrics"] if key in r] for run in runs]
            steps = [s for s, _ in curves[0]]
            means = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
            ax.plot(steps, means, marker="o", label=variant)
    axes[0].set(title="accuracy on train prompts (16 samples, T=1)", xlabel="learner step")
    axes[1].set(title="distinct correct answers per prompt", xlabel="learner step")
    valid, width = hist["valid"], 0.8 / (len(results) + 2)
    xs = range(len(valid))
    for i, (label, probs) in enumerate([("target ∝ π_ref", hist["target"]),
                                        *hist["empirical"].items()]):  # fmt: skip
        axes[2].bar([x + i * width for x in xs], probs, width, label=label)
    axes[2].axhline(1 / len(valid), color="gray", linestyle="--", label="uniform")
    axes[2].set_xticks([x + width for x in xs], valid, rotation=90)
    axes[2].set(title=f"answers to {hist['prompt']!r} (seed {hist['seed']})")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def histogram(out: Path, results: dict, seed: int) -> dict:
    """The prompt with the largest valid set: target vs each variant's correct answers."""
    from flowrl_async.tasks.digits import DigitSumTask

    task = DigitSumTask(**TASK)
    prompt = max(task.train_prompts, key=lambda p: len(task.valid_set(p)))
    valid = task.valid_set(prompt)
    some_run = Path(next(iter(results.values()))[0]["run_dir"])  # any variant given
    empirical = {}
    for variant, runs in results.items():
        run = next(r for r in runs if r["seed"] == seed)
        lines = Path(run["run_dir"], "eval-train", "samples.jsonl").read_text().splitlines()
        got = Counter(
            s["completion"].strip()
            for s in map(json.loads, lines)
            if s["prompt_id"] == prompt.prompt_id and s["info"] == "ok"
        )
        total = max(sum(got.values()), 1)
        empirical[variant] = [got[v] / total for v in valid]
    from flowrl_async.model import load_policy, load_tokenizer
    from flowrl_async.tasks.target import Reference, reference_target

    ref = some_run / "init_model"
    target = reference_target(Reference(load_policy(ref), load_tokenizer(ref)), task, prompt, valid)
    return {"prompt": prompt.text, "seed": seed, "valid": list(valid), "target": target,
            "empirical": empirical}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS[:3]), choices=VARIANTS)
    p.add_argument("--samples", type=int, default=64, help="eval completions per prompt")
    p.add_argument("--out", default="bench-out/flowrl_vs_grpo")
    a = p.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {v: [] for v in a.variants}
    for seed in a.seeds:
        for variant in a.variants:
            run_dir = out / f"{variant}-seed{seed}"
            if not (run_dir / "final_policy").exists():  # resumable: skip done runs
                shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts over
                train(config(variant, seed, a.steps, run_dir, max(a.steps // 8, 1)))
            ev = {}
            for t in TEMPERATURES:
                if not (eval_dir(run_dir, "train", t) / "eval.json").exists():
                    evaluate_policy(run_dir, a.samples, seed, t)
                for s in ("train", "eval"):
                    path = eval_dir(run_dir, s, t)
                    ev[f"{s} T={t}"] = json.loads((path / "eval.json").read_text())
                    ev[f"{s} T={t}"]["tv_to_target"] = tv_to_target(run_dir, path)
            results[variant].append({"seed": seed, "run_dir": str(run_dir), "eval": ev,
                                     "metrics": read_metrics(run_dir / "metrics.jsonl")})  # fmt: skip
    trained = a.steps * TrainConfig().learner.batch_groups
    print(f"\n{len(a.seeds)} seeds, {a.steps} steps × {TrainConfig().learner.batch_groups} groups "
          f"= {trained} trained groups each; eval {a.samples} samples/prompt")  # fmt: skip
    columns = (*COLUMNS, f"pass@{a.samples}")
    for split in [f"{s} T={t}" for s in ("train", "eval") for t in TEMPERATURES]:
        rows = [
            (variant, *(mean_std([r["eval"][split][c] for r in runs]) for c in columns))
            for variant, runs in results.items()
        ]
        print(f"\n{split.replace('eval', 'held-out')} prompts:")
        print(_common.table(("variant", *columns), rows, (16, *[15] * len(columns))))
    hist = histogram(out, results, a.seeds[0])
    png = plot(results, out / "flowrl_vs_grpo.png", hist)
    slim = {v: [{k: r[k] for k in ("seed", "run_dir", "eval")} for r in runs]
            for v, runs in results.items()}  # fmt: skip
    (out / "results.json").write_text(json.dumps({"args": vars(a), "results": slim,
                                                   "histogram": hist}, indent=2))  # fmt: skip
    print(f"\nwrote {png} and {out / 'results.json'}")


if __name__ == "__main__":
    main()
