"""FlowRL against GRPO on the real system, on two tasks: accuracy, diversity, length.

Each variant is trained by the main job (Ray, replay service, learner, vLLM actors) with the
same model, warm-start, task, steps × batch (= trained groups) and seeds:

    grpo              GRPO as users run it now (configs/algo/grpo_dapo.yaml: token-mean,
                      clip-higher), FIFO, max_staleness 1
    flowrl            the paper: group-normalised reward, β = 15, clipped IS, FIFO, staleness 1
    flowrl_replay     off-policy trajectory balance (configs/algo/flowrl_tb.yaml: raw reward,
                      β = 3, mean residual, IS off) with half of each batch replayed
                      (configs/replay/mixed.yaml)
    flowrl_replay_sol the same in the sum_over_len residual (target π_ref·exp(β r))
    vargrad_replay    VarGrad (configs/algo/vargrad.yaml) with the same replay
    flowrl_tb_fresh   the ablation: flowrl_replay's objective on fresh groups only

Tasks: ``digits`` (2 digits summing to s: one answer length, partial credit 0.5) and ``sums``
(s as a sum of digits 1–9: 2^(s−1) answers of 1 to 2s − 1 characters, reward 0/1).
``--tag NAME --set key=value ...`` runs a variant with overrides (e.g. ``--tag b9 --set
algo.beta=9``), recorded as ``variant+NAME``.

Each final policy is sampled ``--samples`` times per prompt at T = 1.0 and 0.6 on the train
and held-out prompts; each prompt's counts and both targets' summaries are kept as one small
JSON per run (``flowrl_async/run/evidence.py``) under ``--records`` (in the repository:
docs/evidence/<task>/). Runs whose record exists are skipped; a run with a final policy but
no record is evaluated; any other run directory starts over. ``--report`` rebuilds the
tables, ``summary.json`` and the figures from the records alone.

    .venv/bin/python benchmarks/flowrl_vs_grpo.py --task sums --steps 500 --seeds 0 1 2 3 4
    .venv/bin/python benchmarks/flowrl_vs_grpo.py --task sums --report
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import _common  # noqa: F401 - one thread per process, before torch
from omegaconf import OmegaConf

from flowrl_async.config import TrainConfig
from flowrl_async.learner.config import AlgoConfig
from flowrl_async.run import evidence
from flowrl_async.run.launch import train
from flowrl_async.run.progress import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    "digits": (
        "flowrl_async.tasks.digits.DigitSumTask",
        {"lengths": [2], "min_solutions": 5, "partial_credit": 0.5},
        8,
    ),
    "sums": ("flowrl_async.tasks.sums.DigitPartsTask", {"totals": [2, 3, 4, 5, 6, 7, 8]}, 16),
}  # fmt: skip  (target, kwargs, generator.max_tokens: the longest answer and <eos> fit)
TASK = TASKS["digits"][1]  # the staleness sweep's task
VARIANTS = ("grpo", "flowrl", "flowrl_replay", "flowrl_replay_sol", "vargrad_replay",
            "flowrl_tb_fresh")  # fmt: skip
TEMPERATURES = (1.0, 0.6)  # the paper evaluates at both
KS = (1, 4, 16, 64)
# bumped when a code change alters what a run does at the same settings (the settings hash
# cannot see it): 2: mixed replay's admission keeps a fresh supply (2026-12-07)
BENCH_REVISION = 2
REF_DRAWS = 256  # samples of π_ref per prompt for the targets' mass outside the valid set


def algo(name: str) -> AlgoConfig:
    return AlgoConfig(**OmegaConf.to_container(OmegaConf.load(ROOT / f"configs/algo/{name}.yaml")))


def config(task: str, variant: str, seed: int, steps: int, run_dir: Path,
           overrides: list[str] = ()) -> TrainConfig:  # fmt: skip
    cfg = TrainConfig(run_dir=str(run_dir), seed=seed)
    cfg.task.target, kwargs, cfg.generator.max_tokens = TASKS[task]
    cfg.task.kwargs = dict(kwargs)
    cfg.learner.steps = steps
    cfg.learner.checkpoint_every = 10**6  # the final policy is all this benchmark needs
    cfg.evaluation.every, cfg.evaluation.split = max(steps // 10, 1), "train"
    cfg.evaluation.samples = 16
    if variant == "grpo":
        cfg.algo = algo("grpo_dapo")
    elif variant == "flowrl":
        cfg.algo = algo("flowrl")
    elif variant in ("flowrl_replay", "flowrl_replay_sol", "vargrad_replay"):
        cfg.algo = algo("vargrad" if variant == "vargrad_replay" else "flowrl_tb")
        if variant == "flowrl_replay_sol":
            cfg.algo.residual = "sum_over_len"
        r = cfg.replay
        r.selector, r.fresh_fraction, r.max_times_sampled, r.max_staleness = "mixed", 0.5, 8, None
    elif variant == "flowrl_tb_fresh":
        cfg.algo = algo("flowrl_tb")
        cfg.replay.max_staleness = None
    else:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    for item in overrides:  # section.key=value, parsed as YAML
        key, _, value = item.partition("=")
        section, _, field = key.partition(".")
        if not hasattr(getattr(cfg, section, None), field):
            raise ValueError(f"--set {item!r}: no such setting {key!r}")
        setattr(
            getattr(cfg, section),
            field,
            OmegaConf.to_container(OmegaConf.create(f"v: {value}"))["v"],
        )
    return cfg


def own_form(cfg: TrainConfig) -> tuple[str, float]:
    """The residual form and β whose target the run's objective has (others: the sum form)."""
    trains_tb = cfg.algo.name in ("flowrl", "flowrl_no_z", "vargrad")
    return (cfg.algo.residual if trains_tb else "sum"), float(cfg.algo.beta)


def changed_settings(cfg: TrainConfig) -> dict:
    """The settings where ``cfg`` differs from the schema's defaults, flattened (seed and
    folder left out): a setting added later, at a default that keeps the old behaviour,
    changes nothing here."""

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    mine, default = flat(asdict(cfg)), flat(asdict(TrainConfig()))
    return {k: v for k, v in mine.items()
            if k not in ("run_dir", "seed") and default.get(k, object()) != v}  # fmt: skip


def settings_id(cfg: TrainConfig, **extra) -> str:
    """A short hash of the changed settings and ``extra``: records and run folders made
    with other settings are never taken for this run's."""
    blob = json.dumps({"cfg": changed_settings(cfg), "revision": BENCH_REVISION, **extra},
                      sort_keys=True, default=str)  # fmt: skip
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def evaluate_records(cfg: TrainConfig, samples: int, temperatures=TEMPERATURES) -> dict:
    """({"train T=1.0": [prompt records], ...}, {"train": [each prompt's targets over its
    valid set, in task.valid_set's order, and the answers' lengths], "eval": ...}) for the
    run's final policy; π_ref is the run's init_model at the run's sampling temperature."""
    from flowrl_async.actors.generator import SampleSpec, build_generator
    from flowrl_async.model import load_policy, load_tokenizer
    from flowrl_async.run.evaluate import reference_draws
    from flowrl_async.tasks import load_task
    from flowrl_async.tasks.target import Reference, reference_report

    run_dir = Path(cfg.run_dir)
    task = load_task(cfg.task.target, **cfg.task.kwargs)
    form, beta = own_form(cfg)
    ref_model, ref_tok = load_policy(run_dir / "init_model"), load_tokenizer(run_dir / "init_model")
    # the targets are defined at the learner's temperature (off-policy TB may sample hotter)
    temperature = cfg.algo.temperature if cfg.algo.temperature is not None else \
        cfg.generator.temperature  # fmt: skip
    draw = reference_draws(ref_model, ref_tok, REF_DRAWS, temperature, cfg.generator.max_tokens)
    reference = Reference(ref_model, ref_tok, form, beta, temperature, draw)
    gen = build_generator("torch", str(run_dir / "final_policy"), cfg.seed, 256, "float32")
    tok = load_tokenizer(run_dir / "final_policy")
    out, targets = {}, {}
    for split, prompts in (("train", task.train_prompts), ("eval", task.eval_prompts)):
        reports = [reference_report(reference, task, p, task.valid_set(p)) for p in prompts]
        targets[split] = [{"prompt": p.text, **{k: r[k] for k in ("own", "tb", "lengths")}}
                          for p, r in zip(prompts, reports, strict=True)]  # fmt: skip
        ids = [tok(p.text)["input_ids"] for p in prompts]
        for t in temperatures:
            spec = SampleSpec(samples, t, 1.0, cfg.generator.max_tokens, cfg.seed)
            records = []
            for prompt, group, report in zip(prompts, gen.generate(ids, spec), reports,
                                             strict=True):  # fmt: skip
                texts = [tok.decode(c.token_ids, skip_special_tokens=True) for c in group]
                verdicts = [task.verify(prompt, x) for x in texts]
                answers = [v.answer if v.info == "ok" else None for v in verdicts]
                rec = evidence.prompt_record(answers, task.valid_set(prompt), report)
                records.append({"prompt": prompt.text, **rec})
            out[f"{split} T={t}"] = records
    return out, targets


def run_one(task: str, name: str, variant: str, seed: int, a, overrides) -> dict:
    run_dir = Path(a.out).resolve() / task / f"{name}-seed{seed}"
    cfg = config(task, variant, seed, a.steps, run_dir, overrides)
    sid = settings_id(cfg, samples=a.samples, draws=REF_DRAWS, temperatures=TEMPERATURES)
    record_path = Path(a.records) / task / f"{name}-seed{seed}.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record.get("settings") != sid:
            raise SystemExit(f"{record_path} was made with other settings "
                             f"({record.get('settings')}, these are {sid}): give another "
                             "--tag or --records")  # fmt: skip
        return record
    marker = run_dir / "bench_settings"
    done = (run_dir / "final_policy").exists() and marker.exists() and marker.read_text() == sid
    if not done:  # an unfinished run, or one made with other settings, starts over
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        marker.write_text(sid)
        t0 = time.time()
        train(cfg)
        (run_dir / "bench_wall_s").write_text(f"{time.time() - t0:.1f}")
    rows = read_metrics(run_dir / "metrics.jsonl")
    tail = rows[-max(len(rows) // 5, 1) :]
    wall = run_dir / "bench_wall_s"
    record = {
        "task": task, "variant": name, "seed": seed, "settings": sid,
        "changed_settings": changed_settings(cfg),
        "steps": cfg.learner.steps,
        "trained_groups": cfg.learner.steps * cfg.learner.batch_groups,
        "overrides": list(overrides), "target": dict(zip(("form", "beta"), own_form(cfg), strict=True)),
        "train_s": rows[-1]["time"],
        "wall_s": float(wall.read_text()) if wall.exists() else None,
        "last_fifth": {k: statistics.fmean(r[k] for r in tail)
                       for k in ("reward_mean", "accuracy", "distinct_correct")},
        "staleness_mean": statistics.fmean(r["staleness_mean"] for r in rows),
        "curve": [{"step": r["step"], "time": round(r["time"], 2),
                   "accuracy": r["eval_accuracy"], "distinct": r["eval_distinct_correct"]}
                  for r in rows if "eval_accuracy" in r],
    }  # fmt: skip
    record["eval"], record["targets"] = evaluate_records(cfg, a.samples)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_rounded(record), separators=(",", ":")))
    tmp.replace(record_path)
    return record


def _rounded(x):
    if isinstance(x, float):
        return None if math.isnan(x) else round(x, 5)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def _nan(x):
    return math.nan if x is None else x


def load_records(folder: Path) -> dict[str, list[dict]]:
    """Records by variant name, seeds in order; a variant's records must share settings."""
    out: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("*-seed*.json")):
        rec = json.loads(path.read_text())
        out.setdefault(rec["variant"], []).append(rec)
    for name, recs in out.items():
        if len({r.get("settings") for r in recs}) > 1:
            raise SystemExit(f"{folder}: the records of {name} were made with different "
                             "settings; keep one set of settings per variant name")  # fmt: skip
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in out.items()}


def figures(recs: list[dict], split: str) -> list[dict]:
    """Per seed: the run's figures on ``split`` (records' None read as nan)."""
    return [evidence.run_figures([{k: _nan(v) if not isinstance(v, dict) else v
                                   for k, v in p.items()} for p in r["eval"][split]], KS)
            for r in recs]  # fmt: skip


def at_time(curve: list[dict], w: float) -> float:
    """A run's in-training eval accuracy at training time ``w``, linear between evaluations
    (the first evaluation's value before it)."""
    points = [(c["time"], c["accuracy"]) for c in curve]
    if not points or w < points[0][0]:
        return points[0][1] if points else math.nan
    for (t0, a0), (t1, a1) in zip(points, points[1:], strict=False):
        if t0 <= w <= t1:
            return a0 + (a1 - a0) * (w - t0) / (t1 - t0) if t1 > t0 else a1
    return points[-1][1]


def equal_time(results: dict[str, list[dict]]) -> tuple[float, dict[str, list[float]]]:
    """W, the shortest run's last evaluation time, and per variant and seed the in-training
    eval accuracy at W (interpolated; the periodic evaluations' pauses count as time, the
    same share for every variant)."""
    w = min(r["curve"][-1]["time"] for recs in results.values() for r in recs if r["curve"])
    return w, {name: [at_time(r["curve"], w) for r in recs] for name, recs in results.items()}


MAIN = ("pass@1", "pass@4", "pass@16", "pass@64", "distinct", "coverage")
SHAPE = ("tv_own", "tv_own_floor", "tv_tb", "tv_tb_floor", "own_distinct", "tb_distinct",
         "own_mass", "tb_mass", "length", "own_length", "tb_length")  # fmt: skip
NO_TARGET = ("tv_own", "tv_own_floor", "own_distinct", "own_mass", "own_length", "tb_mass")


def cell(values: list[float], seeds: int | None = None) -> str:
    """mean ± std [95% t-interval] over seeds (n=k where only k of ``seeds`` have a value:
    a distance needs a solved prompt); — if none."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "—"
    s = evidence.interval(values)
    some = f" (n={len(values)})" if seeds is not None and len(values) < seeds else ""
    if math.isnan(s["ci95"]):
        return f"{s['mean']:.3f}{some}"
    lo, hi = s["mean"] - s["ci95"], s["mean"] + s["ci95"]
    return f"{s['mean']:.3f} ± {s['std']:.3f} [{lo:.3f}, {hi:.3f}]{some}"


def markdown(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def report(task: str, folder: Path, docs: Path) -> dict:
    """Markdown tables (mean ± std [95% interval] over seeds), summary.json beside the
    records, and the figures in ``docs``."""
    results = load_records(folder)
    if not results:
        raise SystemExit(f"no records in {folder}")
    summary = {"task": task, "variants": {}}
    for split in [f"{s} T={t}" for s in ("train", "eval") for t in TEMPERATURES]:
        tables = {"main": [], "shape": []}
        for name, recs in results.items():
            figs = figures(recs, split)
            cells = {c: [f.get(c, math.nan) for f in figs] for c in MAIN + SHAPE}
            if recs[0]["target"]["form"] == "sum" and not name.startswith(("flowrl", "vargrad")):
                cells.update({c: [] for c in NO_TARGET})
            for table, columns in (("main", MAIN), ("shape", SHAPE)):
                tables[table].append((name, len(recs),
                                      *(cell(cells[c], len(recs)) for c in columns)))  # fmt: skip
            summary["variants"].setdefault(name, {})[split] = {
                c: evidence.interval(kept) for c, v in cells.items()
                if (kept := [x for x in v if not math.isnan(x)])}  # fmt: skip
        where = split.replace("eval", "held-out")
        print(f"\n{task}, {where} prompts: pass@k, distinct correct answers, coverage\n")
        print(markdown(("variant", "seeds", *MAIN), tables["main"]))
        print(f"\n{task}, {where} prompts: distances to the targets (prompts with a correct "
              "answer), the targets' shares on the valid set, lengths\n")  # fmt: skip
        print(markdown(("variant", "seeds", *SHAPE), tables["shape"]))
    w, acc_at_w = equal_time(results)
    print(f"\n{task}, equal training time: in-training eval accuracy (16 samples per train "
          f"prompt, T = 1) at {w:.0f} s, the shortest run's last evaluation:\n")  # fmt: skip
    rows = []
    for name, recs in results.items():
        train_s = [r["train_s"] for r in recs]
        groups_s = [r["trained_groups"] / r["train_s"] for r in recs]
        rows.append((name, len(recs), cell(acc_at_w[name]), cell(train_s), cell(groups_s),
                     cell([r["last_fifth"]["accuracy"] for r in recs])))  # fmt: skip
        summary["variants"][name]["equal_time"] = {
            "w_s": w, "accuracy": evidence.interval(acc_at_w[name]),
            "train_s": evidence.interval(train_s),
            "groups_per_s": evidence.interval(groups_s)}  # fmt: skip
    print(markdown(("variant", "seeds", f"accuracy at {w:.0f} s", "training s",
                    "trained groups/s", "batch accuracy, last fifth"), rows))  # fmt: skip
    docs.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(_rounded(summary), indent=1))
    pngs = plot(task, results, docs)
    print(f"\nwrote {folder / 'summary.json'}, " + " and ".join(map(str, pngs)))
    return summary


def plot(task: str, results: dict[str, list[dict]], docs: Path) -> list[Path]:
    """evidence_<task>.png (pass@k curves, accuracy over training time, distinct answers) and
    evidence_<task>_lengths.png (each variant's correct answers' lengths against its own
    target's and π_ref·exp(β r)/Z's, on the train prompts at T = 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
    for ax, split in zip(axes, ("train T=1.0", "eval T=1.0"), strict=False):
        for name, recs in results.items():
            figs = figures(recs, split)
            ks = [k for k in KS if all(f"pass@{k}" in f for f in figs)]
            means = [statistics.fmean(f[f"pass@{k}"] for f in figs) for k in ks]
            sds = [statistics.stdev(f[f"pass@{k}"] for f in figs) if len(figs) > 1 else 0
                   for k in ks]  # fmt: skip
            ax.errorbar(ks, means, yerr=sds, marker="o", capsize=3, label=name)
        ax.set(xscale="log", xticks=KS, xticklabels=[str(k) for k in KS], ylim=(0, 1.02),
               xlabel="k", title=f"pass@k, {split.replace('eval', 'held-out')} prompts")  # fmt: skip
    for ax, key, title in (
        (axes[2], "accuracy", "accuracy during training (train prompts)"),
        (axes[3], "distinct", "distinct correct answers per prompt (of 16)"),
    ):
        for name, recs in results.items():
            curves = [[(c["time"], c[key]) for c in r["curve"]] for r in recs]
            n = min(len(c) for c in curves)
            ax.plot([statistics.fmean(c[j][0] for c in curves) for j in range(n)],
                    [statistics.fmean(c[j][1] for c in curves) for j in range(n)], marker=".",
                    label=name)  # fmt: skip
        ax.set(xlabel="training time (s), mean over seeds", title=title)
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(f"task {task}: mean over seeds (error bars: std)")
    fig.tight_layout()
    main = docs / f"evidence_{task}.png"
    fig.savefig(main, dpi=90)
    plt.close(fig)
    cols = 3
    rows = (len(results) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(16, 4 * rows), squeeze=False)
    for ax, (name, recs) in zip(axes.flat, results.items(), strict=False):
        prompts = [p for r in recs for p in r["eval"]["train T=1.0"]]
        for key, style, label in (("lengths", "-o", "policy's correct answers"),
                                  ("own_lengths", "--", "its objective's target"),
                                  ("tb_lengths", ":", "π_ref·exp(βr)/Z")):  # fmt: skip
            if key == "own_lengths" and recs[0]["target"]["form"] == "sum":
                continue  # the sum forms' own target is π_ref·exp(βr)/Z
            h = evidence.length_histogram(prompts, key)
            ax.plot(list(h), list(h.values()), style, label=label)
        ax.set(
            xlabel="answer length (tokens, <eos> included)",
            ylabel="share",
            title=f"{name} ({len(recs)} seeds)",
        )
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(results) :]:
        ax.axis("off")
    fig.suptitle(f"task {task}: correct answers' lengths against the targets, train prompts")
    fig.tight_layout()
    lengths = docs / f"evidence_{task}_lengths.png"
    fig.savefig(lengths, dpi=90)
    plt.close(fig)
    return [main, lengths, tradeoff(task, results, docs)]


def tradeoff(task: str, results: dict[str, list[dict]], docs: Path) -> Path:
    """evidence_<task>_tradeoff.png: pass@1 against distinct correct answers per train prompt
    (the evaluation's samples per prompt, T = 1), a point per seed and each variant's mean; the issue's bar (within 3
    points of GRPO's pass@1 with ≥ 3× its distinct answers) shaded, and where each objective's
    own target sits (its accuracy and the distinct answers expected in 64 of its samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = "train T=1.0"
    fig, ax = plt.subplots(figsize=(8.5, 6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, recs) in enumerate(results.items()):
        figs = figures(recs, split)
        x, y = [f["distinct"] for f in figs], [f["pass@1"] for f in figs]
        color = colors[i % len(colors)]
        ax.scatter(x, y, color=color, alpha=0.35, s=18)
        ax.errorbar(statistics.fmean(x), statistics.fmean(y), marker="o", color=color,
                    label=f"{name} ({len(recs)} seeds)")  # fmt: skip
        if recs[0]["target"]["form"] == "sum" and not name.startswith(("flowrl", "vargrad")):
            continue  # GRPO has no target
        optimum = [optimum_point(r, split) for r in recs]
        ax.scatter(statistics.fmean(o[0] for o in optimum),
                   statistics.fmean(o[1] for o in optimum), marker="*", s=160, color=color,
                   edgecolor="black", linewidth=0.6)  # fmt: skip
    if "grpo" in results:
        figs = figures(results["grpo"], split)
        acc = statistics.fmean(f["pass@1"] for f in figs)
        distinct = statistics.fmean(f["distinct"] for f in figs)
        right = max(ax.get_xlim()[1], 3 * distinct + 1)
        ax.fill_between([3 * distinct, right], acc - 0.03, 1.02,
                        color="green", alpha=0.12,
                        label="the issue's bar: ≥ GRPO − 3 points, ≥ 3× its distinct")  # fmt: skip
    samples = next(iter(results.values()))[0]["eval"][split][0]["n"]
    ax.set(xlabel=f"distinct correct answers per train prompt ({samples} samples, T = 1)",
           ylabel="pass@1 (train prompts, T = 1)", ylim=(0, 1.02),
           title=f"task {task}: accuracy against diversity "
                 "(dots: seeds; circles: means; stars: each objective's own target)")  # fmt: skip
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = docs / f"evidence_{task}_tradeoff.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def optimum_point(record: dict, split: str) -> tuple[float, float]:
    """(distinct correct answers expected in as many samples as the policy had, accuracy) of
    the run's own target,
    averaged over the prompts of ``split``: where the objective would take the policy."""
    prompts = record["eval"][split]
    targets = {t["prompt"]: t for t in record["targets"][split.split()[0]]}
    distinct = [evidence.expected_distinct([p["own_mass"] * q for q in
                                            targets[p["prompt"]]["own"]], p["n"])
                for p in prompts]  # fmt: skip
    return statistics.fmean(distinct), statistics.fmean(p["own_mass"] for p in prompts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=list(TASKS), default="sums")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--tag", default="", help="a name for --set overrides (variant+tag)")
    p.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--samples", type=int, default=64, help="eval completions per prompt")
    p.add_argument("--out", default="bench-out/evidence", help="run directories")
    p.add_argument("--records", default=str(ROOT / "docs/evidence"), help="per-run JSON")
    p.add_argument("--report", action="store_true", help="tables and figures only")
    a = p.parse_args()
    if a.overrides and not a.tag:
        p.error("--set needs --tag (the records of a changed variant must not collide)")
    if not a.report:
        for seed in a.seeds:  # seed-major: a cut-short sweep has every variant's first seeds
            for variant in a.variants:
                name = f"{variant}+{a.tag}" if a.tag else variant
                run_one(a.task, name, variant, seed, a, a.overrides)
    report(a.task, Path(a.records) / a.task, ROOT / "docs")


if __name__ == "__main__":
    main()
