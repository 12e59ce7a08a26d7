"""Hand-worked values for the objectives; the arithmetic is in the comments."""

import math

import pytest
import torch

from flowrl_async.learner.objectives import (
    flowrl_loss,
    group_normalized_rewards,
    grpo_loss,
    reinforce_loss,
    sequence_importance_weights,
)

GARBAGE = 1234.5  # finite nonsense in padded positions; it must never show up in a result


def close(actual, expected, tol=1e-6):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert torch.allclose(actual, expected, atol=tol, rtol=0), f"{actual} != {expected}"


# ---------------------------------------------------------------- group_normalized_rewards


def test_group_normalized_rewards_interleaved_groups_and_singletons():
    # group 7: rewards 1, 0, 0, 1 -> mean 0.5, unbiased var = 4·0.25/3 = 1/3
    # group 9: rewards 5, 2       -> mean 3.5, unbiased var = 2·2.25/1 = 4.5
    # group 2: reward 3 alone     -> 0
    rewards = torch.tensor([1.0, 5.0, 0.0, 3.0, 0.0, 2.0, 1.0])
    groups = torch.tensor([7, 9, 7, 2, 7, 9, 7])
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)  # ≈ 0.866024
    b = 1.5 / (math.sqrt(4.5) + 1e-6)  # ≈ 0.707106
    out = group_normalized_rewards(rewards, groups)
    assert out.dtype == torch.float32
    close(out, [a, b, -a, 0.0, -a, -b, a])
    # any hashable ids give the same answer
    ids = ["g7", "g9", "g7", "g2", "g7", "g9", "g7"]
    close(group_normalized_rewards(rewards, ids), out)


def test_group_normalized_rewards_constant_group_is_zero_and_eps_applies():
    # all-equal group: std 0 -> 0 / (0 + eps) = 0, never NaN
    out = group_normalized_rewards(torch.tensor([2.0, 2.0, 2.0]), torch.tensor([0, 0, 0]))
    close(out, [0.0, 0.0, 0.0])
    # eps is added to the std: rewards 0, 1 -> std = sqrt(0.5), (±0.5)/(sqrt(0.5)+0.1)
    out = group_normalized_rewards(torch.tensor([0.0, 1.0]), torch.tensor([3, 3]), eps=0.1)
    c = 0.5 / (math.sqrt(0.5) + 0.1)
    close(out, [-c, c])


def test_group_normalized_rewards_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="rewards and group_ids"):
        group_normalized_rewards(torch.zeros(3), torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------- importance weights

LOGPROBS = torch.tensor([[-1.0, -2.0, GARBAGE], [-0.5, -0.5, -0.5], [-0.1, -0.1, GARBAGE]])
BEHAVIOR = torch.tensor([[-1.5, -1.0, -GARBAGE], [-0.5, -0.4, -0.6], [-1.1, -0.1, 7.0]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0]])
# row 0: s = (−1 + 1.5) + (−2 + 1) = −0.5   -> e^−0.5 ≈ 0.606531
# row 1: s = 0 + (−0.1) + 0.1 = 0          -> 1
# row 2: s = (−0.1 + 1.1) + 0 = 1          -> e ≈ 2.718282
RAW = [math.exp(-0.5), 1.0, math.e]


@pytest.mark.parametrize(
    "mode, kwargs, expected",
    [
        ("none", {}, RAW),
        ("off", {}, [1.0, 1.0, 1.0]),  # off-policy TB: no correction at all
        ("clip", {}, [0.8, 1.0, 1.2]),  # clamp to [1 − 0.2, 1 + 0.2]
        ("clip", {"clip_low": 0.5, "clip_high": 1.0}, [math.exp(-0.5), 1.0, 2.0]),
        ("truncate", {"truncate_at": 2.0}, [math.exp(-0.5), 1.0, 2.0]),
        ("truncate", {}, RAW),  # default truncate_at = 10 leaves these alone
    ],
)
def test_sequence_importance_weights(mode, kwargs, expected):
    logprobs = LOGPROBS.clone().requires_grad_(True)
    w = sequence_importance_weights(logprobs, BEHAVIOR, MASK, mode=mode, **kwargs)
    assert not w.requires_grad  # detached
    close(w, expected)
    # a bool mask gives the same as a 0/1 mask
    close(sequence_importance_weights(LOGPROBS, BEHAVIOR, MASK.bool(), mode=mode, **kwargs), w)


def test_sequence_importance_weights_ignores_nonfinite_padding():
    logprobs = LOGPROBS.clone()
    logprobs[0, 2] = float("nan")
    logprobs[2, 2] = float("-inf")
    close(sequence_importance_weights(logprobs, BEHAVIOR, MASK, mode="none"), RAW)


def test_unknown_is_mode_is_an_error():
    with pytest.raises(ValueError, match="importance-sampling mode 'clipp'"):
        sequence_importance_weights(LOGPROBS, BEHAVIOR, MASK, mode="clipp")


# ---------------------------------------------------------------- flowrl_loss

# B = 2, T = 3; row 0 has two response tokens, row 1 three.
FL_VALUES = {
    "logprobs": [[-1.0, -2.0, GARBAGE], [-0.5, -1.5, -1.0]],
    "ref": [[-1.5, -1.5, -GARBAGE], [-0.9, -0.9, -0.9]],
    "log_z": [0.2, -0.3],
    "rewards": [0.3, -0.05],
}
FL_LOGPROBS, FL_REF, FL_LOG_Z, FL_REWARDS = (torch.tensor(v) for v in FL_VALUES.values())
FL_MASK = torch.tensor([[True, True, False], [True, True, True]])
# beta = 2:
# δ0 = 0.2 + mean(−1, −2) − 2·0.3 − mean(−1.5, −1.5)       = 0.2 − 1.5 − 0.6 + 1.5 = −0.4
# δ1 = −0.3 + mean(−0.5, −1.5, −1) − 2·(−0.05) − (−0.9)    = −0.3 − 1 + 0.1 + 0.9  = −0.3
# δ² = 0.16, 0.09


def test_flowrl_loss_on_policy():
    out = flowrl_loss(FL_LOGPROBS, FL_REF, FL_LOGPROBS, FL_MASK, FL_LOG_Z, FL_REWARDS, beta=2.0)
    close(out.loss, (0.16 + 0.09) / 2)  # w = 1 for both
    close(out.metrics["delta_sq"], 0.125)
    close(out.metrics["log_z"], -0.05)
    close(out.metrics["is_weight_mean"], 1.0)
    close(out.metrics["is_ess"], 1.0)
    close(out.metrics["is_clip_fraction"], 0.0)
    assert isinstance(out.metrics["delta_sq"], float)


def test_flowrl_loss_stale_with_each_is_mode():
    # behaviour row 0: s0 = (−1 + 1.5) + (−2 + 1.5) = 0      -> w0 = 1
    # behaviour row 1: s1 = 0 + 0 + (−1 + 1.5)      = 0.5    -> w1 = e^0.5 ≈ 1.648721
    behavior = torch.tensor([[-1.5, -1.5, 3.0], [-0.5, -1.5, -1.5]])
    args = (FL_LOGPROBS, FL_REF, behavior, FL_MASK, FL_LOG_Z, FL_REWARDS)
    clip = flowrl_loss(*args, beta=2.0, is_mode="clip")
    close(clip.loss, (1.0 * 0.16 + 1.2 * 0.09) / 2)  # = 0.134
    close(clip.metrics["is_weight_mean"], 1.1)
    close(clip.metrics["is_clip_fraction"], 0.5)
    # ESS of the raw weights: (1 + e^0.5)² / (2·(1 + e))
    close(clip.metrics["is_ess"], (1 + math.exp(0.5)) ** 2 / (2 * (1 + math.e)))
    none = flowrl_loss(*args, beta=2.0, is_mode="none")
    close(none.loss, (0.16 + math.exp(0.5) * 0.09) / 2)  # ≈ 0.154193
    trunc = flowrl_loss(*args, beta=2.0, is_mode="truncate", truncate_at=1.5)
    close(trunc.loss, (0.16 + 1.5 * 0.09) / 2)
    off = flowrl_loss(*args, beta=2.0, is_mode="off")
    close(off.loss, (0.16 + 0.09) / 2)  # weight 1 on both rows = 0.125
    close(off.metrics["is_weight_mean"], 1.0)
    close(off.metrics["is_clip_fraction"], 0.0)  # nothing was clipped: weighting is off
    close(off.metrics["is_ess"], clip.metrics["is_ess"])  # raw ESS still says how off-policy


def test_flowrl_loss_normalizer_for_micro_batches():
    # one optimizer step of 4 sequences split in two micro-batches of 2: each divides by 4
    out = flowrl_loss(
        FL_LOGPROBS, FL_REF, FL_LOGPROBS, FL_MASK, FL_LOG_Z, FL_REWARDS, beta=2.0, normalizer=4
    )
    close(out.loss, 0.25 / 4)
    with pytest.raises(ValueError, match="normalizer"):
        flowrl_loss(FL_LOGPROBS, FL_REF, FL_LOGPROBS, FL_MASK, FL_LOG_Z, FL_REWARDS, normalizer=0)


def test_flowrl_loss_float64_and_bool_vs_int_mask():
    lp, ref, log_z, rewards = (torch.tensor(v, dtype=torch.float64) for v in FL_VALUES.values())
    out = flowrl_loss(lp, ref, lp, FL_MASK.int(), log_z, rewards, beta=2.0)
    assert out.loss.dtype == torch.float64
    close(out.loss, 0.125, tol=1e-12)


def test_flowrl_gradient_matches_analytic():
    # L = (1/B) Σ_i w_i δ_i²  with w detached:
    #   ∂L/∂logprobs_it = (2/B)·w_i·δ_i·mask_it/n_i,   ∂L/∂log_z_i = (2/B)·w_i·δ_i
    g = torch.Generator().manual_seed(0)
    B, T = 5, 4
    logprobs = (-torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)
    behavior = -torch.rand(B, T, generator=g, dtype=torch.float64)
    ref = (-torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)
    log_z = torch.randn(B, generator=g, dtype=torch.float64).requires_grad_(True)
    rewards = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    beta = 3.0
    out = flowrl_loss(
        logprobs,
        ref,
        behavior,
        mask,
        log_z,
        rewards,
        beta=beta,
        is_mode="truncate",
        truncate_at=1.1,
    )
    out.loss.backward()
    n = mask.sum(-1).double()
    m = mask.double()
    with torch.no_grad():
        delta = log_z + (logprobs * m).sum(-1) / n - beta * rewards - (ref * m).sum(-1) / n
        w = ((logprobs - behavior) * m).sum(-1).exp().clamp(max=1.1)
        expected_lp = (2 / B) * (w * delta / n)[:, None] * m
        expected_z = (2 / B) * w * delta
    close(logprobs.grad, expected_lp, tol=1e-12)
    close(log_z.grad, expected_z, tol=1e-12)
    assert ref.grad is None  # the reference policy is frozen


# ---------------------------------------------------------------- GRPO and REINFORCE


def test_grpo_loss_hand_worked():
    # row 0, A = +1: ratios e^0 = 1, e^0.5 ≈ 1.6487 -> clipped to 1.2
    #   −min(1·1, 1·1) = −1; −min(1.6487, 1.2) = −1.2; mean = −1.1
    # row 1, A = −1, one token: ratio e^(−0.5 + 0.2) = e^−0.3 ≈ 0.7408 -> clip 0.8
    #   −min(−0.7408, −0.8) = 0.8
    # loss = (−1.1 + 0.8)/2 = −0.15; clipped tokens 2 of 3
    logprobs = torch.tensor([[-1.0, -1.0], [-0.5, GARBAGE]], requires_grad=True)
    behavior = torch.tensor([[-1.0, -1.5], [-0.2, -GARBAGE]])
    mask = torch.tensor([[1, 1], [1, 0]])
    out = grpo_loss(logprobs, behavior, mask, torch.tensor([1.0, -1.0]))
    close(out.loss, -0.15)
    close(out.metrics["clip_fraction"], 2 / 3)
    out.loss.backward()
    # only row 0 token 0 is unclipped: ∂/∂lp of −ρ·A/(n=2)/(B=2) = −1·1/4
    close(logprobs.grad, [[-0.25, 0.0], [0.0, 0.0]])


def test_grpo_kl_term_k3():
    # one token, logprob −1, ref −2: d = ref − θ = −1, k3 = e^−1 + 1 − 1 = e^−1
    # on-policy, A = 0: surrogate 0, loss = kl_coef · e^−1
    lp = torch.tensor([[-1.0]])
    out = grpo_loss(
        lp,
        lp,
        torch.tensor([[1]]),
        torch.tensor([0.0]),
        ref_logprobs=torch.tensor([[-2.0]]),
        kl_coef=0.5,
    )
    close(out.loss, 0.5 * math.exp(-1))


def test_reinforce_loss_hand_worked():
    # row 0: Σ lp = −3, w = e^−0.5 → none mode; A = 2: −e^−0.5·2·(−3) = 6·e^−0.5
    # row 1: Σ lp = −1.5, w = 1, A = −1: −1·(−1)·(−1.5) = −1.5
    logprobs = torch.tensor([[-1.0, -2.0, GARBAGE], [-0.5, -0.5, -0.5]])
    behavior = torch.tensor([[-0.5, -2.0, 0.0], [-0.5, -0.5, -0.5]])  # s0 = −0.5, s1 = 0
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = reinforce_loss(logprobs, behavior, mask, torch.tensor([2.0, -1.0]), is_mode="none")
    close(out.loss, (6 * math.exp(-0.5) - 1.5) / 2)


def test_the_registry_holds_exactly_the_objectives_the_config_accepts():
    from flowrl_async.learner.config import OBJECTIVES as NAMES
    from flowrl_async.learner.objective import OBJECTIVES

    assert tuple(OBJECTIVES) == NAMES
    assert all(name == o.name for name, o in OBJECTIVES.items())


# ---------------------------------------------------------------- residual forms


def residual_batch():
    # row 0: two response tokens, a padded third holding garbage; row 1: three tokens
    logprobs = torch.tensor([[-1.0, -2.0, GARBAGE], [-1.0, -1.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.5, GARBAGE], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    return logprobs, ref, mask, torch.tensor([0.5, -0.5]), torch.tensor([1.0, 0.0])


@pytest.mark.parametrize(
    "form, expected, token_grad",
    [
        # mean: 0.5 + (−1.5) − 2·1 − (−1.5) = −1.5;  −0.5 + (−1) − 0 − (−2) = 0.5
        ("mean", [-1.5, 0.5], [1 / 2, 1 / 3]),
        # sum:  0.5 + (−3) − 2 − (−3) = −1.5;        −0.5 + (−3) − 0 − (−6) = 2.5
        ("sum", [-1.5, 2.5], [1.0, 1.0]),
        # sum_over_len: the sum residual / |y|: −1.5 / 2 = −0.75;  2.5 / 3
        ("sum_over_len", [-0.75, 2.5 / 3], [1 / 2, 1 / 3]),
    ],
)
def test_each_residual_form_by_hand(form, expected, token_grad):
    from flowrl_async.learner.objectives import residual

    logprobs, ref, mask, log_z, rewards = residual_batch()
    delta, _, _ = residual(log_z, logprobs, ref, mask, rewards, beta=2.0, form=form)
    close(delta.detach(), expected)
    (grad,) = torch.autograd.grad(delta.sum(), logprobs)
    # dδ_i/d log π_it on response tokens: 1/|y| (mean, sum_over_len) or 1 (sum); padding 0
    close(grad, [[token_grad[0]] * 2 + [0.0], [token_grad[1]] * 3])


def test_flowrl_loss_uses_the_residual_form_it_is_given():
    logprobs, ref, mask, log_z, rewards = residual_batch()
    behavior = logprobs.detach().clone()  # on-policy: every weight 1
    out = flowrl_loss(logprobs, ref, behavior, mask, log_z, rewards, beta=2.0, form="sum")
    close(out.loss.detach(), ((-1.5) ** 2 + 2.5**2) / 2)  # (2.25 + 6.25) / 2 = 4.25
    with pytest.raises(ValueError, match="residual form"):
        flowrl_loss(logprobs, ref, behavior, mask, log_z, rewards, form="median")


# ---------------------------------------------------------------- non-finite guards


def test_log_ratios_are_clamped_before_exp_and_the_ess_stays_finite():
    # row 0's behaviour log-probs are 100 lower per token than the policy's: Σ = 200, past
    # float32's exp range (~88); clamped to 20 it gives e^20. Row 1 is on-policy: weight 1.
    # ESS = (e^20 + 1)² / (2·(e^40 + 1)) = 0.5 (to 1e-8)
    logprobs = torch.tensor([[-1.0, -1.0], [-2.0, GARBAGE]])
    behavior = torch.tensor([[-101.0, -101.0], [-2.0, GARBAGE]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    weights = sequence_importance_weights(logprobs, behavior, mask, mode="none")
    close(weights, [math.exp(20.0), 1.0], tol=1e-3 * math.exp(20.0))
    out = flowrl_loss(logprobs.requires_grad_(), torch.zeros(2, 2), behavior, mask,
                      torch.zeros(2), torch.zeros(2), is_mode="none")  # fmt: skip
    assert math.isfinite(out.metrics["is_ess"]) and out.metrics["is_ess"] == pytest.approx(0.5)
    assert torch.isfinite(out.loss)


# ---------------------------------------------------------------- IS levels, masking, mismatch


def test_geometric_level_takes_the_mean_token_log_ratio():
    # token gaps log π − log μ: row 0: 0.2, 0.4 -> Σ 0.6, mean 0.3; row 1: 0.1 (+ padding)
    from flowrl_async.learner.objectives import sequence_log_ratio

    logprobs = torch.tensor([[-1.0, -1.0], [-1.0, GARBAGE]])
    behavior = torch.tensor([[-1.2, -1.4], [-1.1, GARBAGE]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    close(sequence_log_ratio(logprobs, behavior, mask, "sequence"), [0.6, 0.1])
    close(sequence_log_ratio(logprobs, behavior, mask, "geometric"), [0.3, 0.1])


def test_mask_mode_zeroes_sequences_outside_the_band_and_their_gradient():
    # sequence ratios e^-1 = 0.37, e^0 = 1, e^1 = 2.72 with the band [0.5, 2]: weights 0, 1, 0
    logprobs = torch.tensor([[-2.0], [-1.0], [-0.5]], requires_grad=True)
    behavior = torch.tensor([[-1.0], [-1.0], [-1.5]])
    mask = torch.ones(3, 1, dtype=torch.bool)
    out = flowrl_loss(logprobs, torch.zeros(3, 1), behavior, mask, torch.zeros(3),
                      torch.ones(3), beta=1.0, is_mode="mask", mask_low=0.5, mask_high=2.0)  # fmt: skip
    # δ = 0 + log π − 1 − 0: the one kept row: −1 − 1 = −2 -> loss = 1·4 / 3
    close(out.loss.detach(), 4.0 / 3.0)
    (grad,) = torch.autograd.grad(out.loss, logprobs)
    close(grad, [[0.0], [2 * -2.0 / 3.0], [0.0]])  # dL/dlogπ = 2wδ/3 on the kept row only
    assert out.metrics["is_masked_fraction"] == pytest.approx(2 / 3)


def test_token_level_weights_and_masked_tokens_give_exactly_zero_gradient():
    # reinforce, is_level=token, is_mode=mask [0.5, 2]: token gaps 0, 1, −1 (ratios 1, e, 1/e):
    # only token 0 keeps a weight (1). loss = −A·Σ_t w_t·log π_t / B, A = 2, B = 1
    logprobs = torch.tensor([[-1.0, -1.0, -1.0]], requires_grad=True)
    behavior = torch.tensor([[-1.0, -2.0, 0.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = reinforce_loss(logprobs, behavior, mask, torch.tensor([2.0]), is_mode="mask",
                         level="token", mask_low=0.5, mask_high=2.0)  # fmt: skip
    close(out.loss.detach(), 2.0)  # −2·(1·−1) = 2
    (grad,) = torch.autograd.grad(out.loss, logprobs)
    close(grad, [[-2.0, 0.0, 0.0]])  # exactly zero for the masked tokens


def test_mismatch_kl_is_k3_per_token():
    # one token, log π − log μ = 0.2: k3 = e^0.2 − 1 − 0.2 = 0.0214027581601699;
    # χ² = e^(2·0.2) − 1 = 0.4918246976412703
    from flowrl_async.learner.objectives import mismatch_metrics

    m = mismatch_metrics(torch.tensor([[-1.0, GARBAGE]]), torch.tensor([[-1.2, GARBAGE]]),
                         torch.tensor([[1, 0]], dtype=torch.bool))  # fmt: skip
    assert m["mismatch_kl"] == pytest.approx(0.0214027581601699, rel=1e-6)
    assert m["is_chi2"] == pytest.approx(0.4918246976412703, rel=1e-6)


# ---------------------------------------------------------------- GRPO as users run it


def test_dual_clip_bounds_a_negative_advantage_token():
    # one token, A = −1, log π − log μ = 2: ρ = e² = 7.389; PPO's min picks ρ·A, so the loss is
    # −ρA = 7.389 with gradient −A·ρ = 7.389; the dual clip at c = 3 caps it at c·|A| = 3,
    # a constant: gradient 0
    for c, loss, grad in ((None, math.exp(2.0), math.exp(2.0)), (3.0, 3.0, 0.0)):
        logprobs = torch.tensor([[-1.0]], requires_grad=True)
        out = grpo_loss(logprobs, torch.tensor([[-3.0]]), torch.ones(1, 1, dtype=torch.bool),
                        torch.tensor([-1.0]), clip_ratio_c=c)  # fmt: skip
        close(out.loss.detach(), loss, tol=1e-5)
        (g,) = torch.autograd.grad(out.loss, logprobs)
        close(g, [[grad]], tol=1e-5)


def test_dr_grpo_advantages_are_centred_but_not_scaled():
    # one group 1, 0, 0, 1: mean 0.5 -> 0.5, −0.5, −0.5, 0.5 (with std: ±0.5/0.57735 = ±0.866)
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    close(group_normalized_rewards(r, [7, 7, 7, 7], std=False), [0.5, -0.5, -0.5, 0.5])
    close(group_normalized_rewards(r, [7, 7, 7, 7]), [0.8660229, -0.8660229, -0.8660229, 0.8660229],
          tol=1e-5)  # fmt: skip


# ---------------------------------------------------------------- vargrad


def test_vargrad_takes_log_z_from_each_groups_mean_residual():
    # sum form, β = 1. group 5: Σlog π = −2, −4; Σlog π_ref = −3, −3; r = 1, 0:
    #   δ₀ = Σlog π − β r − Σlog π_ref = 0, −1; log Ẑ = −mean(δ₀) = 0.5; δ = 0.5, −0.5
    # group 9 (one row): δ = 0.  loss = (0.25 + 0.25 + 0) / 3 = 1/6
    from flowrl_async.learner.objectives import vargrad_loss

    logprobs = torch.tensor([[-1.0, -1.0], [-2.0, -2.0], [-1.0, GARBAGE]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.5], [-1.5, -1.5], [-0.7, GARBAGE]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 0]], dtype=torch.bool)
    out = vargrad_loss(logprobs, ref, mask, torch.tensor([1.0, 0.0, 1.0]),
                       torch.tensor([5, 5, 9]), beta=1.0, form="sum")  # fmt: skip
    close(out.loss.detach(), 1.0 / 6.0)
    (g,) = torch.autograd.grad(out.loss, logprobs)
    # log Ẑ detached: dL/dlog π_t = 2δ_i/3 on every token of row i
    close(g, [[1 / 3, 1 / 3], [-1 / 3, -1 / 3], [0.0, 0.0]])


def test_whole_group_micro_batches_never_split_a_group():
    from flowrl_async.learner.batch import TrainBatch, micro_batches

    n = 6  # groups of 2, 3 and 1 rows
    batch = TrainBatch(torch.ones(n, 4, dtype=torch.long), torch.ones(n, 4, dtype=torch.long), 2,
                       torch.ones(n, 2, dtype=torch.bool), torch.zeros(n, 2), torch.zeros(n),
                       torch.zeros(n, dtype=torch.bool), torch.tensor([0, 0, 1, 1, 1, 2]),
                       torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long))  # fmt: skip
    assert micro_batches(batch, 4, whole_groups=True) == [[0, 1], [2, 3, 4, 5]]
    assert micro_batches(batch, 2, whole_groups=True) == [[0, 1], [2, 3, 4], [5]]  # 3 > 2: alone
    assert micro_batches(batch, 6, 16, whole_groups=True) == [[0, 1], [2, 3, 4, 5]]  # 6·4 > 16


def test_whole_group_packing_counts_the_padding_of_mixed_prompts_and_responses():
    # group 0: 10-token prompts, 1-token responses; group 1: 1-token prompts, 10-token
    # responses. Together the padded micro-batch is 4 × (10 + 10) = 80 tokens, not 4 × 11
    from flowrl_async.learner.batch import TrainBatch, micro_batches

    attention = torch.zeros(4, 20, dtype=torch.long)
    attention[:2, :11] = 1  # prompt 10 + response 1
    attention[2:, 9:] = 1  # prompt 1 + response 10
    response = torch.zeros(4, 10, dtype=torch.bool)
    response[:2, :1], response[2:, :] = True, True
    batch = TrainBatch(torch.ones(4, 20, dtype=torch.long), attention, 10, response,
                       torch.zeros(4, 10), torch.zeros(4), torch.zeros(4, dtype=torch.bool),
                       torch.tensor([0, 0, 1, 1]), torch.zeros(4, dtype=torch.long),
                       torch.zeros(4, dtype=torch.long))  # fmt: skip
    assert micro_batches(batch, 8, 44, whole_groups=True) == [[0, 1], [2, 3]]
    assert micro_batches(batch, 8, 80, whole_groups=True) == [[0, 1, 2, 3]]
