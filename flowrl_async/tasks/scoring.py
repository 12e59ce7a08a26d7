"""Scoring: verify k completions per prompt and measure accuracy and diversity.

Per prompt (``score_prompt``), and as means over prompts (``sample_and_score``):
- avg@k: mean reward; accuracy: fraction correct (info "ok");
- pass@k: the unbiased estimator 1 − C(n−c, k)/C(n, k) averaged over prompts (n samples, c
  correct), for k = 1 and k = n;
- distinct correct answers per prompt;
- on tasks whose valid set is enumerable (``task.valid_set(prompt)``): coverage (fraction of
  the valid set sampled at least once), total-variation distance between the empirical
  distribution of correct answers and the uniform distribution over the valid set, and the
  entropy (nats) of the correct answers' empirical distribution.
"""

from __future__ import annotations

import math
from collections import Counter

from flowrl_async.tasks.target import reference_targets


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def distribution_metrics(
    answers: list[str], valid: tuple[str, ...], target: list[float] | None = None
) -> dict[str, float]:
    """Coverage, TV to uniform over ``valid``, entropy of the correct answers, and with
    ``target`` (probabilities over ``valid``) the TV distance to it."""
    counts = Counter(a for a in answers if a in set(valid))
    total = sum(counts.values())
    coverage = len(counts) / len(valid)
    if total == 0:
        out = {"coverage": 0.0, "tv_to_uniform": 1.0, "entropy": 0.0}
        return out if target is None else {**out, "tv_to_target": 1.0}
    uniform = 1.0 / len(valid)
    tv = 0.5 * sum(abs(counts.get(v, 0) / total - uniform) for v in valid)
    entropy = -sum((c / total) * math.log(c / total) for c in counts.values())
    out = {"coverage": coverage, "tv_to_uniform": tv, "entropy": entropy}
    if target is not None:
        pairs = zip(valid, target, strict=True)
        out["tv_to_target"] = 0.5 * sum(abs(counts.get(v, 0) / total - t) for v, t in pairs)
    return out


def score_prompt(prompt, completions: list[str], verify, valid, target=None,
                 tb_target=None) -> tuple[dict, list[dict]]:  # fmt: skip
    verdicts = [verify(prompt, text) for text in completions]
    correct = [v for v in verdicts if v.info == "ok"]
    n, c = len(verdicts), len(correct)
    answers = [v.answer for v in correct]
    row = {
        "prompt_id": prompt.prompt_id,
        "avg": sum(v.reward for v in verdicts) / n,
        "accuracy": c / n,
        "pass@1": pass_at_k(n, c, 1),
        f"pass@{n}": pass_at_k(n, c, n),
        "distinct_correct": len(set(answers)),
    }
    if valid is not None:
        row.update(distribution_metrics(answers, valid, target))
        if tb_target is not None:
            tv = distribution_metrics(answers, valid, tb_target)["tv_to_target"]
            row["tv_to_tb_target"] = tv
    samples = [
        {"prompt_id": prompt.prompt_id, "prompt": prompt.text, "completion": text,
         "reward": v.reward, "info": v.info}
        for text, v in zip(completions, verdicts, strict=True)
    ]  # fmt: skip
    return row, samples


def sample_and_score(generator, tokenizer, task, prompts, spec,
                     reference=None) -> tuple[dict, list, list]:  # fmt: skip
    """Generate ``spec.n`` completions per prompt and score them; ``reference``
    (``target.Reference``): π_ref and the objective, for the TV distance to its target on
    the valid set (``tv_to_target``) and to π_ref·exp(β r)/Z there (``tv_to_tb_target``).

    -> (means over prompts of every per-prompt metric, per-prompt rows, sample lines)."""
    ids = [tokenizer(p.text)["input_ids"] for p in prompts]
    rows, lines = [], []
    for prompt, group in zip(prompts, generator.generate(ids, spec), strict=True):
        texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in group]
        valid = task.valid_set(prompt) if hasattr(task, "valid_set") else None
        target = tb_target = None
        if valid is not None and reference is not None:
            target, tb_target = reference_targets(reference, task, prompt, valid)
        row, sample_lines = score_prompt(prompt, texts, task.verify, valid, target, tb_target)
        rows.append(row)
        lines.extend(sample_lines)
    keys = [k for k in rows[0] if k != "prompt_id"]
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}, rows, lines
