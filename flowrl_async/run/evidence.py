"""The evidence benchmark's figures (benchmarks/flowrl_vs_grpo.py): what one run's final
policy did on each prompt, kept as small JSON, and the statistics over seeds.

A prompt's record holds only counts and the targets' summaries, so every table and figure
can be rebuilt from the records without the run directories:
    n, correct            samples and correct ones (pass@k for any k <= n)
    distinct, coverage    distinct correct answers; their share of the valid set
    tv_own, tv_tb         TV distance of the correct answers' distribution to the objective's
                          own target and to π_ref·exp(β r)/Z, both on the valid set (None
                          for a prompt with no correct answer). On the valid set every answer
                          has the full reward, so π_ref·exp(β r)/Z there is π_ref renormalised,
                          whatever β: tv_tb and tb_length compare every objective alike
    tv_own_floor, tv_tb_floor   the expected TV of as many samples drawn from the target
                          itself: what a policy equal to the target would score (few correct
                          samples spread over many answers are far from any distribution)
    own_mass, tb_mass     each target's share on the valid set: the accuracy its optimum has
    length                mean token length (<eos> included) of the correct answers, each
                          counted at its valid spelling's length
    own_length, tb_length the same under each target (restricted to the valid set)
    lengths, own_lengths, tb_lengths   the three length distributions, {length: share}
    own_distinct, tb_distinct   the expected distinct answers among as many samples of each
                          target as the policy had correct ones: its diversity at that accuracy
    answers               {correct answer: count}: any other figure can be computed later
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter

from flowrl_async.tasks.scoring import pass_at_k

# Student's t 0.975 quantiles (a two-sided 95% interval) for 1..30 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip
FLOOR_DRAWS = 200  # Monte Carlo draws of the expected TV of a sample of the target


def t_quantile(df: int) -> float:
    """Student's t 0.975 quantile for ``df`` degrees of freedom (past 30: 30's, wider)."""
    if df < 1:
        raise ValueError("a confidence interval needs at least 2 values")
    return _T975[min(df, 30) - 1]


def interval(values: list[float]) -> dict:
    """Mean, sample std and the 95% t-interval's half-width over ``values`` (one per seed)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "std": math.nan, "ci95": math.nan, "n": len(values)}
    std = statistics.stdev(values)
    return {"mean": mean, "std": std, "ci95": t_quantile(len(values) - 1) * std /
            math.sqrt(len(values)), "n": len(values)}  # fmt: skip


def _share(counter: Counter) -> dict[str, float]:
    total = sum(counter.values())
    return {str(k): v / total for k, v in sorted(counter.items())} if total else {}


def _dist_lengths(probs: list[float], lengths: list[int]) -> dict[str, float]:
    out: Counter = Counter()
    for p, n in zip(probs, lengths, strict=True):
        out[n] += p
    return {str(k): v for k, v in sorted(out.items())}


def _tv(counts: Counter, total: int, valid: tuple[str, ...], probs: list[float]) -> float:
    if total == 0:
        return math.nan
    return 0.5 * sum(abs(counts.get(v, 0) / total - p) for v, p in zip(valid, probs, strict=True))


def tv_floor(probs: list[float], n: int, draws: int = FLOOR_DRAWS, seed: int = 0) -> float:
    """The expected TV distance between ``probs`` and the empirical distribution of ``n``
    samples drawn from it (Monte Carlo, seeded); nan for n = 0."""
    if n == 0:
        return math.nan
    rng, items = random.Random(seed), range(len(probs))
    total = 0.0
    for _ in range(draws):
        counts = Counter(rng.choices(items, weights=probs, k=n))
        total += 0.5 * sum(abs(counts.get(i, 0) / n - p) for i, p in enumerate(probs))
    return total / draws


def expected_distinct(probs: list[float], n: int) -> float:
    """The expected number of distinct values among ``n`` draws from ``probs``."""
    return sum(1.0 - (1.0 - p) ** n for p in probs)


def prompt_record(answers: list[str | None], valid: tuple[str, ...], report: dict) -> dict:
    """One prompt's record from its samples' correct answers (None for a wrong sample) and
    ``report`` (``tasks.target.reference_report``: targets, their shares, lengths)."""
    index = {v: i for i, v in enumerate(valid)}
    correct = [a for a in answers if a is not None and a in index]
    counts = Counter(correct)
    lengths = Counter(report["lengths"][index[a]] for a in correct)
    own, tb, n_tokens = report["own"], report["tb"], report["lengths"]
    return {
        "n": len(answers),
        "correct": len(correct),
        "distinct": len(counts),
        "coverage": len(counts) / len(valid),
        "tv_own": _tv(counts, len(correct), valid, own),
        "tv_tb": _tv(counts, len(correct), valid, tb),
        "tv_own_floor": tv_floor(own, len(correct)),
        "tv_tb_floor": tv_floor(tb, len(correct)),
        "own_distinct": expected_distinct(own, len(correct)),
        "tb_distinct": expected_distinct(tb, len(correct)),
        "own_mass": report["own_mass"],
        "tb_mass": report["tb_mass"],
        "length": statistics.fmean(lengths.elements()) if correct else math.nan,
        "own_length": sum(p * n for p, n in zip(own, n_tokens, strict=True)),
        "tb_length": sum(p * n for p, n in zip(tb, n_tokens, strict=True)),
        "lengths": _share(lengths),
        "own_lengths": _dist_lengths(own, n_tokens),
        "tb_lengths": _dist_lengths(tb, n_tokens),
        "answers": dict(sorted(counts.items())),
    }


def run_figures(records: list[dict], ks: tuple[int, ...] = (1, 4, 16, 64)) -> dict[str, float]:
    """One run's figures on one split: means over its prompts' records. The distances and
    ``length`` average the prompts with a correct answer (nan if none); pass@k is the
    unbiased estimator."""
    out = {f"pass@{k}": statistics.fmean(pass_at_k(r["n"], r["correct"], k) for r in records)
           for k in ks if all(r["n"] >= k for r in records)}  # fmt: skip
    for key in ("distinct", "coverage", "own_mass", "tb_mass", "own_length", "tb_length",
                "own_distinct", "tb_distinct"):  # fmt: skip
        if all(key in r for r in records):  # records before a figure existed lack it
            out[key] = statistics.fmean(r[key] for r in records)
    solved = [r for r in records if r["correct"]]
    for key in ("tv_own", "tv_tb", "tv_own_floor", "tv_tb_floor"):
        values = [r[key] for r in solved if key in r]  # records before the floors lack them
        out[key] = statistics.fmean(values) if values else math.nan
    out["length"] = statistics.fmean(r["length"] for r in solved) if solved else math.nan
    out["length_vs_own"] = (statistics.fmean(r["length"] - r["own_length"] for r in solved)
                            if solved else math.nan)  # fmt: skip
    return out


def length_histogram(records: list[dict], key: str) -> dict[int, float]:
    """The mean over prompts of one length distribution (``lengths``, ``own_lengths``,
    ``tb_lengths``); prompts without correct answers are left out of ``lengths``."""
    rows = [r[key] for r in records if r[key]]
    out: Counter = Counter()
    for row in rows:
        for k, v in row.items():
            out[int(k)] += v / len(rows)
    return dict(sorted(out.items()))
