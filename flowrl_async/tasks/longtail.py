"""A built-in task whose answer lengths follow a heavy-tailed law: "write k dots".

Prompt text ``"dots 37:"``; the one valid completion is k dots. The prompts' k are the
quantiles of a discrete power law P(k) ∝ k^(−alpha) on [1, max_count] (prompt i gets the
smallest k whose cumulative probability reaches (i + ½)/prompts), so most answers are short
and a few are long: the length distribution under which a batch waits for its slowest
response and a streaming actor does not. The format warm-start writes dots in numbers drawn
from the same law, so even the warm-started model's lengths have that tail. Reward 1 or 0.

Invariants: prompt ids are stable; the verifier never raises; ``valid_set`` and ``verify``
agree on every string.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass

from flowrl_async.tasks.digits import Verdict


@dataclass(frozen=True)
class Prompt:
    """One prompt: how many dots to write."""

    prompt_id: int
    text: str
    count: int


def power_law_cdf(max_count: int, alpha: float) -> list[float]:
    """Cumulative P(k) ∝ k^(−alpha) for k = 1..max_count."""
    weights = [k**-alpha for k in range(1, max_count + 1)]
    total = sum(weights)
    return [c / total for c in itertools.accumulate(weights)]


def quantile_counts(prompts: int, max_count: int, alpha: float) -> list[int]:
    """The k of each of ``prompts`` evenly spaced quantiles of the law."""
    cdf = power_law_cdf(max_count, alpha)
    return [min(max_count, bisect.bisect_left(cdf, (i + 0.5) / prompts) + 1)
            for i in range(prompts)]  # fmt: skip


class LongTailTask:
    """The built-in long-tail task: k dots, k heavy-tailed across prompts."""

    name = "longtail"

    def __init__(self, prompts: int = 64, max_count: int = 96, alpha: float = 1.2,
                 held_out_fraction: float = 0.25, seed: int = 0):  # fmt: skip
        if prompts < 1 or max_count < 1 or alpha <= 0:
            raise ValueError("longtail needs prompts >= 1, max_count >= 1 and alpha > 0")
        counts = quantile_counts(prompts, max_count, alpha)
        all_prompts = [Prompt(i, f"dots {k}:", k) for i, k in enumerate(counts)]
        order = list(range(len(all_prompts)))
        random.Random(seed).shuffle(order)
        n_eval = int(round(held_out_fraction * len(order)))
        self.eval_prompts = [all_prompts[i] for i in sorted(order[:n_eval])]
        self.train_prompts = [all_prompts[i] for i in sorted(order[n_eval:])]
        self._cdf = power_law_cdf(max_count, alpha)

    def verify(self, prompt: Prompt, completion: str) -> Verdict:
        answer = completion.strip()
        if not answer:
            return Verdict(0.0, "empty")
        if set(answer) != {"."}:
            return Verdict(0.0, "malformed")
        if len(answer) != prompt.count:
            return Verdict(0.0, "wrong count", answer)
        return Verdict(1.0, "ok", answer)

    def valid_set(self, prompt: Prompt) -> tuple[str, ...]:
        return ("." * prompt.count,)

    def format_example(self, prompt: Prompt, rng: random.Random) -> str:
        """Well-formed, not necessarily correct: dots in a number drawn from the law."""
        return "." * (bisect.bisect_left(self._cdf, rng.random()) + 1)
