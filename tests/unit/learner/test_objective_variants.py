"""The FlowRL authors' later variants (token-level CISPO-style weights, no log Z) and GRPO's
loss aggregations: hand-worked values, the arithmetic in the comments, padding that holds
garbage; then the learner's token-count normaliser on a real step."""

import numpy as np
import pytest
import torch

from flowrl_async.learner.config import AlgoConfig
from flowrl_async.learner.learner import Learner
from flowrl_async.learner.objective import OBJECTIVES, LossInputs
from flowrl_async.learner.objectives import flowrl_loss, grpo_loss
from flowrl_async.model import build_tiny_model, load_policy
from flowrl_async.records import Group, Response
from flowrl_async.replay.client import SampleInfo

G = 1234.5  # finite nonsense in padded positions; it must never show up in a result


def close(actual, expected, tol=1e-6):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert torch.allclose(actual, expected, atol=tol, rtol=0), f"{actual} != {expected}"


# two rows: row 0 has 3 tokens, row 1 one token; the rest is padding
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
LOGPROBS = [[-1.0, -1.0, -1.0, G], [-0.5, G, G, G]]
# row 0's token gaps log π − log μ: 0, 0.5, −0.5 -> ratios 1, 1.6487, 0.6065, clipped to
# [0.8, 1.2]: 1, 1.2, 0.8; row 1's gap 0 -> 1
BEHAVIOR = torch.tensor([[-1.0, -1.5, -0.5, G], [-0.5, G, G, G]])
REF = torch.tensor([[-2.0, -2.0, -2.0, G], [-1.0, G, G, G]])
W0 = [1.0, 1.2, 0.8]


@pytest.mark.parametrize(
    "form, loss, grad0, grad1, grad_log_z",
    [
        # mean: δ0 = 0.5 + (−1) − 1·1 − (−2) = 0.5, δ1 = 0 + (−0.5) − 0 − (−1) = 0.5;
        # loss = (0.25 + 0.25) / 2; ∂/∂log π_0t = 2·δ0·w_t·(1/3) / 2 = w_t/6;
        # ∂/∂log π_10 = 2·0.5·1 / 2 = 0.5; ∂/∂log Z = 2δ/2 = δ
        ("mean", 0.25, [w / 6 for w in W0], 0.5, [0.5, 0.5]),
        # sum: δ0 = 0.5 − 3 − 1 + 6 = 2.5, δ1 = 0.5; loss = (6.25 + 0.25)/2 = 3.25;
        # ∂/∂log π_0t = 2·2.5·w_t / 2 = 2.5·w_t; row 1: 0.5
        ("sum", 3.25, [2.5 * w for w in W0], 0.5, [2.5, 0.5]),
        # sum_over_len: δ0 = 2.5/3, δ1 = 0.5/1; loss = (6.25/9 + 0.25)/2 = 0.4722222;
        # ∂/∂log π_0t = 2·(2.5/3)·w_t/3 / 2 = 2.5·w_t/9; ∂/∂log Z_0 = 2·(2.5/3)/3 / 2
        ("sum_over_len", (6.25 / 9 + 0.25) / 2, [2.5 * w / 9 for w in W0], 0.5,
         [2.5 / 9, 0.5]),
    ],
)  # fmt: skip
@pytest.mark.parametrize("garbage", [G, float("nan"), float("inf"), -float("inf")])
def test_token_level_weights_scale_each_tokens_gradient(form, loss, grad0, grad1, grad_log_z,
                                                        garbage):  # fmt: skip
    def pad(t):  # the same tensor with ``garbage`` wherever the mask is False
        return torch.where(MASK, torch.as_tensor(t), torch.tensor(garbage))

    logprobs = pad(LOGPROBS).requires_grad_(True)
    log_z = torch.tensor([0.5, 0.0], requires_grad=True)
    out = flowrl_loss(logprobs, pad(REF), pad(BEHAVIOR), MASK, log_z, torch.tensor([1.0, 0.0]),
                      beta=1.0, is_mode="clip", clip_low=0.2, clip_high=0.2, form=form,
                      level="token")  # fmt: skip
    close(out.loss.detach(), loss)
    g_pi, g_z = torch.autograd.grad(out.loss, (logprobs, log_z))
    close(g_pi, [[*grad0, 0.0], [grad1, 0.0, 0.0, 0.0]])  # padding: exactly 0
    close(g_z, grad_log_z)
    # metrics over the 4 real tokens: 2 of them clipped; weights 1, 1.2, 0.8, 1 -> mean 1
    assert out.metrics["is_clip_fraction"] == pytest.approx(0.5)
    assert out.metrics["is_weight_mean"] == pytest.approx(1.0)


def test_token_level_mask_mode_gives_a_token_outside_the_band_zero_gradient():
    # band [0.5, 1.5]: ratio 1.6487 -> weight 0, 0.6065 stays; the masked token's gradient
    # is exactly 0 while the residual still counts its log-prob (δ0 = 0.5 as above)
    logprobs = torch.tensor(LOGPROBS, requires_grad=True)
    out = flowrl_loss(logprobs, REF, BEHAVIOR, MASK, torch.tensor([0.5, 0.0]),
                      torch.tensor([1.0, 0.0]), beta=1.0, is_mode="mask", mask_low=0.5,
                      mask_high=1.5, level="token")  # fmt: skip
    (g,) = torch.autograd.grad(out.loss, logprobs)
    raw = float(np.exp(-0.5))  # 0.60653, kept raw
    close(g[0, :3], [1 / 6, 0.0, raw / 6])
    assert out.metrics["is_masked_fraction"] == pytest.approx(0.25)


def test_flowrl_without_log_z_is_the_residual_with_log_z_zero():
    # mean form, β = 1: δ0 = 0 + (−1) − 1 − (−2) = 0, δ1 = (−0.5) − 0 − (−1) = 0.5;
    # sequence weights: row 0 exp(0 + 0.5 − 0.5) = 1, row 1 1 -> loss = (0 + 0.25)/2
    logprobs = torch.tensor(LOGPROBS, requires_grad=True)
    x = LossInputs(logprobs, BEHAVIOR, MASK, torch.tensor([1.0, 0.0]), REF, None)
    out = OBJECTIVES["flowrl_no_z"].loss(x, AlgoConfig(name="flowrl_no_z", beta=1.0), 2.0)
    close(out.loss.detach(), 0.125)
    assert not OBJECTIVES["flowrl_no_z"].uses_log_z
    (g,) = torch.autograd.grad(out.loss, logprobs)
    close(g, [[0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]])  # 2·0.5/2 on row 1


# ---------------------------------------------------------------- GRPO aggregations
# rows of 3 and 1 tokens, ρ = 1 everywhere, A = (−1, 1): every token's loss is −ρ·A, i.e.
# +1 on row 0's three tokens and −1 on row 1's one; ∂ℓ_t/∂log π_t = −A


@pytest.mark.parametrize(
    "agg, normalizer, loss, grad0, grad1",
    [
        # per-sequence means (1, −1), summed over 2 rows: 0; row 0's tokens 1/3/2, row 1 −1/2
        ("seq-mean-token-mean", 2.0, 0.0, 1 / 6, -0.5),
        # Σ_t: 3 − 1 = 2 over 4 tokens; every token 1/4
        ("token-mean", 4.0, 0.5, 0.25, -0.25),
        # Σ_t / 4 per row: 3/4, −1/4, summed over 2 rows: 0.25; every token 1/(4·2)
        ("seq-mean-token-sum-norm", 2.0, 0.25, 0.125, -0.125),
    ],
)
def test_grpo_loss_aggregations(agg, normalizer, loss, grad0, grad1):
    logprobs = torch.tensor(LOGPROBS, requires_grad=True)
    out = grpo_loss(logprobs, torch.tensor(LOGPROBS), MASK, torch.tensor([-1.0, 1.0]),
                    normalizer=normalizer, agg=agg, norm_len=4)  # fmt: skip
    close(out.loss.detach(), loss)
    (g,) = torch.autograd.grad(out.loss, logprobs)
    close(g, [[grad0] * 3 + [0.0], [grad1, 0.0, 0.0, 0.0]])


def test_sum_norm_without_a_length_is_refused():
    with pytest.raises(ValueError, match="needs norm_len"):
        grpo_loss(torch.tensor(LOGPROBS), torch.tensor(LOGPROBS), MASK, torch.ones(2),
                  agg="seq-mean-token-sum-norm")  # fmt: skip


# ---------------------------------------------------------------- on the learner's step


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "m", seed=1)


def groups():
    """Two groups of 3 with responses of 1 to 4 tokens."""
    out = []
    for k, lengths in enumerate(((1, 4, 2), (3, 1, 4))):
        responses = tuple(
            Response(np.arange(5 + j, 5 + j + n, dtype=np.int32), np.full(n, -2.5, np.float32),
                     float((j + k) % 2), "stop", 0, 0)
            for j, n in enumerate(lengths)
        )  # fmt: skip
        out.append(Group(f"g{k}", 0, np.array([1, 20 + k], np.int32), "t", responses))
    return out, [SampleInfo(1, 0, 0.0)] * 2


def grads_after_one_step(model_dir, micro_batch, agg):
    torch.manual_seed(0)
    policy, ref = load_policy(model_dir), load_policy(model_dir)
    learner = Learner(policy, ref, torch.nn.Linear(1, 1), AlgoConfig(name="grpo", loss_agg=agg),
                      lambda b, v: groups(), pad_token_id=0, batch_groups=2,
                      micro_batch=micro_batch, grad_clip=1e9)  # fmt: skip
    learner.optimizer.step = lambda: None  # keep the gradients to compare them
    metrics = learner.step()
    return [p.grad.clone() for p in policy.parameters()], metrics


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_the_step_gradient_does_not_depend_on_the_micro_batch_split(model_dir, agg):
    # token-mean divides by the step's 15 response tokens, whatever the split
    whole, m1 = grads_after_one_step(model_dir, 6, agg)
    split, m2 = grads_after_one_step(model_dir, 1, agg)
    for a, b in zip(whole, split, strict=True):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-6)


def test_token_mean_and_sequence_mean_differ_on_the_same_batch(model_dir):
    tok, _ = grads_after_one_step(model_dir, 6, "token-mean")
    seq, _ = grads_after_one_step(model_dir, 6, "seq-mean-token-mean")
    assert not all(torch.allclose(a, b, atol=1e-7) for a, b in zip(tok, seq, strict=True))


def test_token_mean_divides_the_step_by_its_response_tokens(model_dir):
    # the step's reported loss is grpo's token-mean over the whole batch (15 response
    # tokens), computed here in one pass, while the learner trains row by row
    from flowrl_async.learner.batch import collate

    torch.manual_seed(0)
    policy, ref = load_policy(model_dir), load_policy(model_dir)
    learner = Learner(policy, ref, torch.nn.Linear(1, 1),
                      AlgoConfig(name="grpo", loss_agg="token-mean"), lambda b, v: groups(),
                      pad_token_id=0, batch_groups=2, micro_batch=1)  # fmt: skip
    gs, infos = groups()
    batch = collate(gs, [i.staleness for i in infos], 0)
    assert int(batch.response_mask.sum()) == 15
    with torch.no_grad():
        lp = learner.policy_fwd(batch, 1.0, False, None).logprobs
    adv = learner.shape_rewards(batch)
    args = (lp, batch.behavior_logprobs, batch.response_mask, adv)
    expected = float(grpo_loss(*args, normalizer=15, agg="token-mean").loss)
    by_rows = float(grpo_loss(*args, normalizer=6, agg="token-mean").loss)
    assert abs(expected - by_rows) > 1e-3  # the two normalisers are told apart
    assert learner.step()["loss"] == pytest.approx(expected, abs=1e-6)
