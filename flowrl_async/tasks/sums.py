"""A built-in task whose valid answers differ in length: "write s as a sum of digits 1–9".

Prompt text ``"add to 5:"``; a valid completion is digits 1–9 joined by ``+`` that add up to
s, e.g. ``"5"``, ``"2+3"``, ``"1+1+3"``: every composition of s into parts of at most 9, in
order (``2+3`` and ``3+2`` are two answers). For s ≤ 9 there are 2^(s−1) of them, from 1 to
2s − 1 characters long, so answer length varies within a prompt and across prompts, and the
valid set is enumerable: coverage, distinct answers and the distance to each objective's
exact target stay exact. The reward is 1 or 0 (no partial credit).

Invariants: prompt ids are stable (the same config gives the same id for the same s); the
verifier never raises; ``valid_answers`` and ``verify`` agree on every string.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cache

from flowrl_async.tasks.digits import Verdict

_FORM = re.compile(r"[1-9](\+[1-9])*")


@dataclass(frozen=True)
class Prompt:
    """One prompt: the total to reach."""

    prompt_id: int
    text: str
    total: int


@cache
def valid_answers(total: int) -> tuple[str, ...]:
    """Every way to write ``total`` as digits 1–9 joined by '+', in order; sorted."""
    if total == 0:
        return ("",)
    out = []
    for first in range(1, min(9, total) + 1):
        out += [str(first) + ("+" + rest if rest else "") for rest in valid_answers(total - first)]
    return tuple(sorted(out))


class DigitPartsTask:
    """The built-in variable-length task: s as a sum of digits 1–9, answers enumerable."""

    name = "sums"

    def __init__(
        self,
        totals: tuple[int, ...] = tuple(range(2, 9)),
        held_out_fraction: float = 0.25,
        seed: int = 0,
        correct_reward: float = 1.0,
        wrong_reward: float = 0.0,
    ):
        if not totals or min(totals) < 1 or max(totals) > 16:
            raise ValueError(f"totals must lie in [1, 16] (2^15 answers at most), got {totals}")
        all_prompts = [Prompt(i, f"add to {s}:", s) for i, s in enumerate(sorted(set(totals)))]
        order = list(range(len(all_prompts)))
        random.Random(seed).shuffle(order)
        n_eval = int(round(held_out_fraction * len(order)))
        self.eval_prompts = [all_prompts[i] for i in sorted(order[:n_eval])]
        self.train_prompts = [all_prompts[i] for i in sorted(order[n_eval:])]
        self.correct_reward, self.wrong_reward = correct_reward, wrong_reward

    def verify(self, prompt: Prompt, completion: str) -> Verdict:
        answer = completion.strip()
        if not answer:
            return Verdict(self.wrong_reward, "empty")
        if not _FORM.fullmatch(answer):
            return Verdict(self.wrong_reward, "malformed")
        if sum(int(c) for c in answer.split("+")) != prompt.total:
            return Verdict(self.wrong_reward, "wrong sum", answer)
        return Verdict(self.correct_reward, "ok", answer)

    def valid_set(self, prompt: Prompt) -> tuple[str, ...]:
        """Every correct answer: the task's valid set is enumerable."""
        return valid_answers(prompt.total)

    def format_example(self, prompt: Prompt, rng: random.Random) -> str:
        """A well-formed (not necessarily correct) answer: 1 to s digits 1–9 joined by '+'."""
        parts = rng.randint(1, max(1, prompt.total))
        return "+".join(str(rng.randint(1, 9)) for _ in range(parts))
