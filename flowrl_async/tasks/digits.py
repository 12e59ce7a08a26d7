"""The built-in multi-solution task: "write k digits whose sum is s".

Prompt text ``"sum 14 len 3:"``; a valid completion is exactly k digits summing to s, e.g.
``"590"``, ``"149"``, ``"077"``. Every prompt has many valid answers and the valid set is
enumerable, so the target distribution, coverage and distinct answers are known exactly.

Invariants: prompt ids are stable (the same config gives the same id for the same (s, k)); the
verifier never raises (malformed output gets reward 0 and a reason); ``valid_answers`` and
``verify`` agree on every string of k digits.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class Prompt:
    """One built-in prompt: the digit count and the sum to reach."""

    prompt_id: int
    text: str
    total: int  # s
    length: int  # k


@dataclass(frozen=True)
class Verdict:
    """The built-in task's verdict on one completion."""

    reward: float
    info: str
    answer: str | None = None  # the normalised answer, for counting distinct correct ones


@cache
def valid_answers(total: int, length: int) -> tuple[str, ...]:
    """Every string of ``length`` digits whose digits sum to ``total``, sorted."""
    return tuple(
        "".join(map(str, d)) for d in itertools.product(range(10), repeat=length) if sum(d) == total
    )


class DigitSumTask:
    """The built-in task: k digits summing to s, with an enumerable valid set."""

    name = "digits"

    def __init__(
        self,
        lengths: tuple[int, ...] = (3,),
        min_solutions: int = 10,
        held_out_fraction: float = 0.25,
        seed: int = 0,
        correct_reward: float = 1.0,
        wrong_reward: float = 0.0,
        partial_credit: float = 0.0,
    ):
        prompts = [
            (total, k)
            for k in lengths
            for total in range(9 * k + 1)
            if len(valid_answers(total, k)) >= min_solutions
        ]
        all_prompts = [
            Prompt(i, f"sum {total} len {k}:", total, k) for i, (total, k) in enumerate(prompts)
        ]
        order = list(range(len(all_prompts)))
        random.Random(seed).shuffle(order)
        n_eval = int(round(held_out_fraction * len(order)))
        self.eval_prompts = [all_prompts[i] for i in sorted(order[:n_eval])]
        self.train_prompts = [all_prompts[i] for i in sorted(order[n_eval:])]
        self._by_id = {p.prompt_id: p for p in all_prompts}
        self.correct_reward, self.wrong_reward = correct_reward, wrong_reward
        self.partial_credit = partial_credit

    def prompt(self, prompt_id: int) -> Prompt:
        return self._by_id[prompt_id]

    def verify(self, prompt: Prompt, completion: str) -> Verdict:
        answer = completion.strip()
        if not answer:
            return Verdict(self.wrong_reward, "empty")
        if not answer.isdigit() or not answer.isascii():
            return Verdict(self.wrong_reward, "not digits")
        if len(answer) != prompt.length:
            return Verdict(self.wrong_reward, "wrong length")
        miss = abs(sum(int(c) for c in answer) - prompt.total)
        if miss:
            # optional shaping: well-formed answers earn partial_credit·2^(−miss)
            shaped = self.partial_credit * 2.0 ** (-miss)
            return Verdict(self.wrong_reward + shaped, "wrong sum", answer)
        return Verdict(self.correct_reward, "ok", answer)

    def valid_set(self, prompt: Prompt) -> tuple[str, ...]:
        """Every correct answer: the task's valid set is enumerable."""
        return valid_answers(prompt.total, prompt.length)

    def format_example(self, prompt: Prompt, rng: random.Random) -> str:
        """A well-formed (not necessarily correct) answer: the supervised warm-start target."""
        return "".join(rng.choice("0123456789") for _ in range(prompt.length))
