"""FlowRL's optimum on a problem small enough to enumerate, against GRPO, and IS correctness.

All 27 sequences of 3 tokens over {0, 1, 2}; reward r(y) = (number of 0 tokens)/3, so "000"
is the unique best answer. With length-normalised log-probs and raw rewards the FlowRL optimum
is π(y) ∝ π_ref(y)·exp(L·β·r(y)) (δ = 0 for every y ⇔ log π = log π_ref + L·β·r − L·log Z).
"""

import torch

from flowrl_async.learner.objectives import (
    flowrl_loss,
    group_normalized_rewards,
    grpo_loss,
    sequence_importance_weights,
)

from tabular import TabularPolicy

VOCAB, LENGTH, BETA = 3, 3, 1.0


def reward(seqs: torch.Tensor) -> torch.Tensor:
    return (seqs == 0).sum(-1).double() / LENGTH


def table(dist: torch.Tensor, seqs: torch.Tensor) -> str:
    return "\n".join(
        f"{''.join(map(str, s.tolist()))}: {p:.4f}"
        for s, p in zip(seqs, dist.tolist(), strict=True)
    )


def test_flowrl_matches_reward_shaped_target_while_grpo_collapses():
    ref = TabularPolicy(VOCAB, LENGTH, seed=0)
    seqs = ref.all_sequences()
    mask = torch.ones(seqs.shape, dtype=torch.bool)
    with torch.no_grad():
        ref_logprobs = ref.token_logprobs(seqs)
    r = reward(seqs)
    target = ref.distribution() * torch.exp(LENGTH * BETA * r)
    target /= target.sum()

    # FlowRL: every sequence once per step (a full-support behaviour policy), IS weight 1.
    flow = TabularPolicy(VOCAB, LENGTH, seed=0)
    log_z = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([*flow.parameters(), log_z], lr=0.05)
    for _ in range(1500):
        logprobs = flow.token_logprobs(seqs)
        out = flowrl_loss(
            logprobs,
            ref_logprobs,
            logprobs.detach(),
            mask,
            log_z.expand(len(seqs)),
            r,
            beta=BETA,
            is_mode="none",
        )
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    flow_dist = flow.distribution()
    tv_flow = 0.5 * (flow_dist - target).abs().sum().item()

    # GRPO: on-policy groups of 16, group-normalised advantages.
    grpo = TabularPolicy(VOCAB, LENGTH, seed=0)
    opt = torch.optim.Adam(grpo.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        batch = grpo.sample(16, gen)
        adv = group_normalized_rewards(reward(batch), torch.zeros(16, dtype=torch.long))
        logprobs = grpo.token_logprobs(batch)
        out = grpo_loss(logprobs, logprobs.detach(), torch.ones_like(batch), adv)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    grpo_dist = grpo.distribution()
    tv_grpo = 0.5 * (grpo_dist - target).abs().sum().item()

    report = (
        f"TV(FlowRL, target) = {tv_flow:.4f}, TV(GRPO, target) = {tv_grpo:.4f}\n"
        f"target:\n{table(target, seqs)}\nFlowRL:\n{table(flow_dist, seqs)}\n"
        f"GRPO:\n{table(grpo_dist, seqs)}"
    )
    assert tv_flow < 0.01, report
    # log Z reaches its fixed point: L·log Z = log Σ_y π_ref(y)·e^(L·β·r(y))
    expected_log_z = torch.log((ref.distribution() * torch.exp(LENGTH * BETA * r)).sum()) / LENGTH
    assert abs(log_z.item() - expected_log_z.item()) < 0.01, report
    # GRPO puts nearly all its mass on the single best answer "000" (target gives it ~0.2).
    assert grpo_dist[0].item() > 0.9, report
    assert target[0].item() < 0.35, report
    assert tv_grpo > 0.5, report


def test_importance_weighted_estimate_is_unbiased():
    # E_π[f] estimated from samples of μ ≠ π with w = π(y)/μ(y) (mode "none") must agree with
    # the exact value, Σ_y π(y)·f(y), within 4 standard errors.
    pi = TabularPolicy(VOCAB, LENGTH, seed=1)
    mu = TabularPolicy(VOCAB, LENGTH, seed=2, scale=0.5)
    n = 4000
    samples = mu.sample(n, torch.Generator().manual_seed(3))
    # pad to T = 5 with garbage the mask hides, as real batches are padded
    pad = torch.full((n, 2), 77.0, dtype=torch.float64)
    with torch.no_grad():
        logprobs = torch.cat([pi.token_logprobs(samples), pad], dim=1)
        behavior_logprobs = torch.cat([mu.token_logprobs(samples), -pad], dim=1)
    mask = torch.cat([torch.ones(n, LENGTH), torch.zeros(n, 2)], dim=1).bool()
    w = sequence_importance_weights(logprobs, behavior_logprobs, mask, mode="none")
    f = reward(samples)
    estimate = (w * f).mean().item()
    stderr = ((w * f).std() / n**0.5).item()
    exact = (pi.distribution() * reward(pi.all_sequences())).sum().item()
    naive = f.mean().item()  # the unweighted mean estimates E_μ[f], not E_π[f]
    msg = f"IS estimate {estimate:.4f} ± {stderr:.4f}, exact {exact:.4f}, unweighted {naive:.4f}"
    assert abs(estimate - exact) < 4 * stderr, msg
    assert abs(naive - exact) > 4 * stderr, msg  # the test can tell weighting from none
