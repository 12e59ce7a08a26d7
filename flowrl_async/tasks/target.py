"""The distribution each trajectory-balance objective converges to, restricted to a task's
enumerable valid set: what ``eval reference=...`` measures the TV distance to.

With δ = 0 for every response y of a prompt (full support, raw rewards r, |y| the response's
tokens including <eos>; learner/objectives.py: residual):
    sum, sum_over_len (and vargrad in those forms):  π(y) = π_ref(y)·exp(β r(y)) / Z
    mean (the paper's):   π(y) = π_ref(y)·exp(|y|·(β r(y) − c)),  c = log Z(x) solving
                          Σ_y π_ref(y)·exp(|y|·(β r(y) − c)) = 1 over every response y.
Restricted to the valid answers (renormalised over them) the sum forms need only π_ref on
the valid set. The mean form's c also needs π_ref's mass outside it, by length and reward:
that part is estimated from samples of π_ref (each non-valid sample stands for 1/N of the
mass; the valid answers' part is exact). With group-normalised rewards (the paper's default)
the rewards the learner used were shaped per batch, so these targets are the raw-reward
idealisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FORMS = ("sum", "sum_over_len", "mean")


@dataclass(frozen=True)
class Reference:
    """π_ref and the objective whose target is measured."""

    model: object
    tokenizer: object
    form: str = "sum"  # the residual form (vargrad: its form; other objectives: sum)
    beta: float = 1.0
    temperature: float = 1.0  # the learner's log-prob temperature of the run
    # the mean form's draws of π_ref: prompt ids -> completions (each with ``token_ids``),
    # e.g. its samples at the run's temperature and length limit (run/evaluate.py)
    draw: object = None


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def solve_log_z(terms: list[tuple[float, int, float]]) -> float:
    """c with Σ exp(log_mass + length·(β r − c)) = 1, for terms (log_mass, length, β·r):
    the sum falls strictly in c (every length >= 1), so bisection finds it."""
    if not terms:
        raise ValueError("no mass to normalise")

    def excess(c: float) -> float:
        return _logsumexp([m + n * (br - c) for m, n, br in terms])

    if not all(math.isfinite(m) for m, _, _ in terms):
        raise ValueError("a mass of the normaliser is not finite")
    lo, hi = -1.0, 1.0
    while excess(lo) < 0:
        lo *= 2
    while excess(hi) > 0:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def target_probs(logps: list[float], lengths: list[int], rewards: list[float], form: str,
                 beta: float, others: list[tuple[int, float]] = (),
                 drawn: int = 0) -> list[float]:  # fmt: skip
    """The target of ``form`` on the valid answers (log π_ref ``logps``, token ``lengths``,
    ``rewards``), renormalised over them. mean: ``others`` are the (length, reward) of the
    ``drawn`` samples of π_ref that were not valid answers (see the module docstring)."""
    if form not in FORMS:
        raise ValueError(f"unknown residual form {form!r}; expected one of {FORMS}")
    if form == "mean":
        if drawn < 1:
            raise ValueError("the mean form's target needs samples of π_ref (drawn >= 1)")
        terms = [(lp, n, beta * r) for lp, n, r in zip(logps, lengths, rewards, strict=True)]
        terms += [(-math.log(drawn), n, beta * r) for n, r in others]
        c = solve_log_z(terms)
        logits = [lp + n * (beta * r - c) for lp, n, r in zip(logps, lengths, rewards, strict=True)]
    else:
        logits = [lp + beta * r for lp, r in zip(logps, rewards, strict=True)]
    top = max(logits)
    weights = [math.exp(v - top) for v in logits]
    return [w / sum(weights) for w in weights]


def answer_logprob(model, prompt_ids: list[int], answer_ids: list[int],
                   temperature: float = 1.0) -> float:  # fmt: skip
    """log π(answer | prompt) at ``temperature``, by one teacher-forced pass."""
    import torch

    ids = torch.tensor([prompt_ids + answer_ids], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1 : -1]
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return float(logp.gather(-1, ids[0, len(prompt_ids) :, None]).sum())


def reference_target(reference: Reference, task, prompt, valid: tuple[str, ...]) -> list[float]:
    """The target of ``reference.form`` over ``valid`` for ``prompt`` (answers followed by
    <eos>; the mean form draws responses of π_ref)."""
    return reference_targets(reference, task, prompt, valid)[0]


def reference_targets(reference: Reference, task, prompt, valid: tuple[str, ...]):
    """(the target of ``reference.form``, π_ref·exp(β r)/Z) over ``valid``, from one pass
    of log-probs per answer."""
    logps, lengths, rewards, others, drawn = _terms(reference, task, prompt, valid,
                                                    reference.form == "mean")  # fmt: skip
    own = target_probs(logps, lengths, rewards, reference.form, reference.beta, others, drawn)
    if reference.form != "mean":  # the sum forms' target is π_ref·exp(β r)/Z itself
        return own, own
    return own, target_probs(logps, lengths, rewards, "sum", reference.beta)


def reference_report(reference: Reference, task, prompt, valid: tuple[str, ...]) -> dict:
    """Both targets over ``valid`` (``own``: the form's, ``tb``: π_ref·exp(β r)/Z), each
    one's share on the valid set (``own_mass``, ``tb_mass``: the accuracy its optimum has),
    and each answer's token ``lengths`` (<eos> included). Needs ``reference.draw``."""
    logps, lengths, rewards, others, drawn = _terms(reference, task, prompt, valid, True)
    form, beta = reference.form, reference.beta
    return {
        "own": target_probs(logps, lengths, rewards, form, beta, others, drawn),
        "tb": target_probs(logps, lengths, rewards, "sum", beta),
        "own_mass": valid_mass(logps, lengths, rewards, form, beta, others, drawn),
        "tb_mass": valid_mass(logps, lengths, rewards, "sum", beta, others, drawn),
        "lengths": lengths,
    }


def valid_mass(logps: list[float], lengths: list[int], rewards: list[float], form: str,
               beta: float, others: list[tuple[int, float]], drawn: int) -> float:  # fmt: skip
    """The share of the target of ``form`` on the valid answers (as ``target_probs``; each of
    the ``drawn`` samples of π_ref in ``others`` stands for 1/drawn of its mass)."""
    if drawn < 1:
        raise ValueError("the target's share on the valid set needs samples of π_ref")
    if form not in FORMS:
        raise ValueError(f"unknown residual form {form!r}; expected one of {FORMS}")
    outside = [(-math.log(drawn), n, r) for n, r in others]
    inside = list(zip(logps, lengths, rewards, strict=True))
    if form == "mean":
        c = solve_log_z([(m, n, beta * r) for m, n, r in inside + outside])
        logit = lambda m, n, r: m + n * (beta * r - c)  # noqa: E731
    else:
        logit = lambda m, n, r: m + beta * r  # noqa: E731
    valid = _logsumexp([logit(*t) for t in inside])
    return math.exp(valid - _logsumexp([logit(*t) for t in inside + outside]))


def _terms(reference: Reference, task, prompt, valid: tuple[str, ...], draw: bool):
    """log π_ref, token lengths and rewards of the valid answers (each followed by <eos>),
    and with ``draw`` the draws of π_ref outside them (``draw_others``)."""
    tok = reference.tokenizer
    prompt_ids = tok(prompt.text)["input_ids"]
    answers = [tok(y, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for y in valid]
    logps = [answer_logprob(reference.model, prompt_ids, a, reference.temperature)
             for a in answers]  # fmt: skip
    rewards = [task.verify(prompt, y).reward for y in valid]
    others, drawn = draw_others(reference, task, prompt, prompt_ids, answers) if draw else ([], 0)
    return logps, [len(a) for a in answers], rewards, others, drawn


def draw_others(reference: Reference, task, prompt, prompt_ids, answers: list[list[int]]):
    """(length, reward) of the draws of π_ref that are none of the valid ``answers``' token
    sequences (another spelling of a valid answer counts here, with its reward), and how
    many were drawn."""
    if reference.draw is None:
        raise ValueError("the mean form's target needs draws of π_ref (Reference.draw)")
    tok = reference.tokenizer
    group = reference.draw(prompt_ids)
    exact = {tuple(a) for a in answers}
    others = [
        (
            len(c.token_ids),
            task.verify(prompt, tok.decode(c.token_ids, skip_special_tokens=True)).reward,
        )
        for c in group
        if tuple(c.token_ids.tolist()) not in exact
    ]
    return others, len(group)
