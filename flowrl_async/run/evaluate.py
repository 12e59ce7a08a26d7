"""``flowrl-async eval``: sample k completions per prompt of a policy and score them
(``flowrl_async.tasks.scoring``). Writes ``samples.jsonl`` (one line per completion: prompt
id, prompt, completion, reward, verifier info) and ``eval.json`` (the scores)."""

from __future__ import annotations

import json
from pathlib import Path

from flowrl_async.tasks.scoring import sample_and_score


def evaluate(generator, tokenizer, task, prompts, samples: int, temperature: float,
             max_tokens: int, out_dir: Path, seed: int = 0, reference=None) -> dict:  # fmt: skip
    from flowrl_async.actors.generator import SampleSpec

    out_dir.mkdir(parents=True, exist_ok=True)
    spec = SampleSpec(samples, temperature, 1.0, max_tokens, seed)
    means, rows, lines = sample_and_score(generator, tokenizer, task, prompts, spec, reference)
    with open(out_dir / "samples.jsonl", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    result = {
        "samples_per_prompt": samples,
        "temperature": temperature,
        "prompts": len(rows),
        **means,
        "per_prompt": rows,
    }
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result


def resolve_model_dir(path: str | Path) -> Path:
    """A model dir as is; a checkpoint's policy/; a run's final_policy/ or newest checkpoint."""
    from flowrl_async.learner.checkpoint import latest

    path = Path(path)
    for candidate in (path, path / "policy", path / "final_policy"):
        if (candidate / "config.json").exists() and any(candidate.glob("*.safetensors")):
            return candidate
    newest = latest(path / "checkpoints")
    if newest is not None:
        return newest / "policy"
    raise FileNotFoundError(f"no model found at {path} (a model, checkpoint or run directory)")


def reference_draws(model, tokenizer, n: int, temperature: float, max_tokens: int):
    """prompt ids -> ``n`` completions of π_ref (the torch sampler), for the mean form."""
    from flowrl_async.actors.generator import SampleSpec
    from flowrl_async.actors.torch_generator import TorchGenerator

    gen = TorchGenerator(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    spec = SampleSpec(n, temperature, 1.0, max_tokens, 0)
    return lambda prompt_ids: gen.generate([prompt_ids], spec)[0]


def run_config(checkpoint: str | Path) -> dict | None:
    """The saved config of the run a model, checkpoint or run directory belongs to."""
    from flowrl_async.run.resume import SAVED

    path = Path(checkpoint).resolve()
    for directory in (path, *path.parents)[:4]:  # RUN, RUN/x, RUN/checkpoints/step-N/policy
        if (directory / SAVED).exists():
            return json.loads((directory / SAVED).read_text())
    return None


def target_of(run: dict | None, cfg) -> tuple[str, float, float]:
    """(residual form, β, π_ref's temperature) of the target eval measures: the eval
    config's where set, else the run's (flowrl and vargrad: their form; others: sum)."""
    algo = (run or {}).get("algo", {})
    trains_tb = algo.get("name") in ("flowrl", "flowrl_no_z", "vargrad")
    own = algo.get("residual", "mean") if trains_tb else "sum"
    form = cfg.residual or (own if run else "sum")
    beta = cfg.beta if cfg.beta is not None else float(algo.get("beta", 1.0))
    temperature = algo.get("temperature") or (run or {}).get("generator", {}).get(
        "temperature", 1.0
    )
    return form, beta, float(temperature)


def run_eval(cfg) -> dict:
    """The ``flowrl-async eval`` command."""
    from flowrl_async.actors.generator import build_generator
    from flowrl_async.model import load_tokenizer
    from flowrl_async.tasks import load_task

    model_dir = resolve_model_dir(cfg.checkpoint)
    task = load_task(cfg.task.target, **cfg.task.kwargs)
    prompts = task.eval_prompts if cfg.split == "eval" else task.train_prompts
    generator = build_generator(cfg.engine, str(model_dir), cfg.seed, 256, "float32")
    out = Path(cfg.out_dir) if cfg.out_dir else model_dir.parent / f"eval-T{cfg.temperature}"
    reference = None
    if cfg.reference:  # π_ref, for the distance to the run's objective's target
        from flowrl_async.model import load_policy
        from flowrl_async.tasks.target import Reference

        ref_dir = resolve_model_dir(cfg.reference)
        run = run_config(cfg.checkpoint)
        form, beta, temperature = target_of(run, cfg)
        # the run's response space: its length limit bounds π_ref's draws
        limit = int((run or {}).get("generator", {}).get("max_tokens", cfg.max_tokens))
        ref_model, ref_tok = load_policy(ref_dir), load_tokenizer(ref_dir)
        draw = reference_draws(ref_model, ref_tok, cfg.reference_samples, temperature, limit)
        reference = Reference(ref_model, ref_tok, form, beta, temperature, draw)
        print(f"target: the {form} residual form's, beta {beta}, pi_ref at T={temperature}")
        if form == "mean" and (run or {}).get("algo", {}).get("reward_norm") == "group":
            print("note: the run trained on group-normalised rewards; the mean form's target "
                  "is computed with the raw rewards (an idealisation: tasks/target.py)")  # fmt: skip
    result = evaluate(generator, load_tokenizer(model_dir), task, prompts, cfg.samples,
                      cfg.temperature, cfg.max_tokens, out, cfg.seed, reference)  # fmt: skip
    shown = {k: v for k, v in result.items() if k != "per_prompt"}
    width = max(map(len, shown))
    for k, v in shown.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(f"wrote {out / 'eval.json'} and {out / 'samples.jsonl'}")
    return result
