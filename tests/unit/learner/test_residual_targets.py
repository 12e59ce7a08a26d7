"""Where each residual form converges when the valid answers have different lengths.

Answers: the 15 distinct token strings of a 3-token tabular policy over {EOS=0, a=1, b=2}
read up to and including the first EOS ("0", "10", "20", "110", ..., and the 8 strings of
three non-EOS tokens): lengths 1, 2 and 3. Reward r = the number of a's (token 1). Every step
trains on all answers once (full support), weight 1. Targets, with |y| the answer's length:
    sum, sum_over_len, vargrad:  π ∝ π_ref·exp(β r)
    mean:                        π = π_ref·exp(|y|·(β r − c)), c fixed by Σ π = 1
"""

import math

import pytest
import torch

from flowrl_async.learner.objectives import flowrl_loss, vargrad_loss

from tabular import TabularPolicy

VOCAB, LENGTH, BETA, EOS = 3, 3, 1.0, 0


def answers():
    """One representative 3-token sequence per answer and its mask (True up to the EOS)."""
    seqs, masks, seen = [], [], set()
    for seq in TabularPolicy(VOCAB, LENGTH, seed=0).all_sequences().tolist():
        end = seq.index(EOS) + 1 if EOS in seq else LENGTH
        if tuple(seq[:end]) in seen:
            continue
        seen.add(tuple(seq[:end]))
        seqs.append(seq)
        masks.append([t < end for t in range(LENGTH)])
    return torch.tensor(seqs), torch.tensor(masks)


def answer_probs(policy, seqs, mask):
    with torch.no_grad():
        lp = policy.token_logprobs(seqs)
        return torch.where(mask, lp, 0.0).sum(-1).exp()


def mean_form_target(ref_p, r, length):
    """π_ref·exp(|y|(β r − c)) with c found by bisection so that it sums to 1."""

    def total(c):
        return float((ref_p * torch.exp(length * (BETA * r - c))).sum())

    lo, hi = -50.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) > 1 else (lo, mid)
    return ref_p * torch.exp(length * (BETA * r - lo))


def train(form, seqs, mask, ref_logprobs, r, vargrad=False):
    policy = TabularPolicy(VOCAB, LENGTH, seed=1)
    log_z = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([*policy.parameters(), log_z], lr=0.05)
    groups = torch.zeros(len(seqs), dtype=torch.long)
    for _ in range(800):
        lp = policy.token_logprobs(seqs)
        if vargrad:
            out = vargrad_loss(lp, ref_logprobs, mask, r, groups, beta=BETA, form=form)
        else:
            out = flowrl_loss(lp, ref_logprobs, lp.detach(), mask, log_z.expand(len(seqs)), r,
                              beta=BETA, is_mode="off", form=form)  # fmt: skip
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return answer_probs(policy, seqs, mask)


@pytest.mark.parametrize("form, vargrad", [("sum", False), ("sum_over_len", False),
                                           ("mean", False), ("sum_over_len", True)])  # fmt: skip
def test_each_residual_form_reaches_its_stated_target(form, vargrad):
    seqs, mask = answers()
    assert len(seqs) == 15 and sorted(set(mask.sum(-1).tolist())) == [1, 2, 3]
    ref = TabularPolicy(VOCAB, LENGTH, seed=0)
    with torch.no_grad():
        ref_logprobs = ref.token_logprobs(seqs)
    ref_p = answer_probs(ref, seqs, mask)
    assert math.isclose(float(ref_p.sum()), 1.0, rel_tol=1e-9)  # the answers partition
    r = torch.where(mask, seqs == 1, False).sum(-1).double()
    length = mask.sum(-1).double()
    tilted = ref_p * torch.exp(BETA * r)
    tilted /= tilted.sum()
    stated = mean_form_target(ref_p, r, length) if form == "mean" else tilted
    got = train(form, seqs, mask, ref_logprobs, r, vargrad)
    tv = 0.5 * float((got - stated).abs().sum())
    tv_tilted = 0.5 * float((got - tilted).abs().sum())
    print(f"{'vargrad ' if vargrad else ''}{form}: TV to its target {tv:.4f}, "
          f"to π_ref·exp(β r)/Z {tv_tilted:.4f}")  # fmt: skip
    assert tv < 0.01
    if form == "mean":  # the paper's form is measurably not the reward-tilted reference
        assert tv_tilted > 0.05
