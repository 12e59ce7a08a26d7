"""Memory-bounded log-probs: the output layer over chunks of positions equals the one-shot
computation (values and gradients), and never holds [N, T, V] logits."""

import math

import pytest
import torch

from flowrl_async.learner.logprobs import token_logprobs


def test_a_hand_worked_position():
    # H = 1, V = 3, W = [[1], [2], [0]], b = [0, 0, 1], h = 1, temperature 2:
    # logits = (1, 2, 1) / 2 = (0.5, 1, 0.5); lse = log(2e^0.5 + e) = 1.5514447...
    # log π(token 1) = 1 − lse; entropy = lse − Σ softmax·logits
    w = torch.tensor([[1.0], [2.0], [0.0]])
    b = torch.tensor([0.0, 0.0, 1.0])
    lp, ent = token_logprobs(torch.ones(1, 1, 1), w, b, torch.tensor([[1]]), 2.0, chunk=1)
    lse = math.log(2 * math.exp(0.5) + math.exp(1.0))
    probs = [math.exp(x - lse) for x in (0.5, 1.0, 0.5)]
    assert lp.item() == pytest.approx(1.0 - lse, abs=1e-7)
    expected = lse - sum(p * x for p, x in zip(probs, (0.5, 1.0, 0.5), strict=True))
    assert ent.item() == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("chunk", [1, 3, 5, 7, 8, 21, 64])
def test_chunks_equal_the_one_shot_values_and_gradients(chunk):
    # N·T = 21 positions: chunks that divide it (1, 3, 7, 21) and that do not (5, 8, 64)
    g = torch.Generator().manual_seed(0)
    n, t, h, v = 3, 7, 16, 50
    hidden = torch.randn(n, t, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    bias = torch.randn(v, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n, t), generator=g)
    upstream = torch.randn(n, t, generator=g)  # an arbitrary loss: Σ c_t · log π_t

    def run(c):
        lp, ent = token_logprobs(hidden, weight, bias, targets, 0.7, chunk=c)
        grads = torch.autograd.grad((lp * upstream).sum(), (hidden, weight, bias))
        return lp.detach(), ent, grads

    ref_lp, ref_ent, ref_grads = run(None)
    lp, ent, grads = run(chunk)
    assert not ent.requires_grad
    torch.testing.assert_close(lp, ref_lp, rtol=1e-6, atol=1e-6)
    # entropy = lse − Σ p·logit cancels (~4.5 − ~3.7): float32 rounding alone reaches 2e-6
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=5e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        # gradients sum over positions in another order: relative to the whole gradient
        # 1e-6 (elementwise, float32 rounding of sums reaches a few 1e-6)
        assert ((got - want).norm() / want.norm()).item() < 1e-6
        torch.testing.assert_close(got, want, rtol=0, atol=5e-6)
    # and the one-shot path is the textbook one
    logits = (hidden @ weight.t() + bias) / 0.7
    textbook = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(ref_lp, textbook.detach(), rtol=0, atol=1e-5)


def test_the_learner_forward_equals_the_full_logits_path(tmp_path):
    # the decoder once, the output layer only over response positions, in chunks, equals
    # log_softmax of the model's own full logits at those positions
    from flowrl_async.learner.batch import collate, forward
    from flowrl_async.model import build_tiny_model, load_policy

    from factories import make_group

    model = load_policy(build_tiny_model(tmp_path / "m", seed=1))
    groups = [make_group("a", n=3, tokens=5), make_group("b", n=2, tokens=3)]
    batch = collate(groups, [0, 0], pad_token_id=0)
    got = forward(model, batch, 0.8, want_hidden=True, chunk=4)
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=position_ids, output_hidden_states=True)  # fmt: skip
    p, t = batch.prompt_width, batch.response_mask.shape[1]
    logp = torch.log_softmax(out.logits[:, p - 1 : p + t - 1].float() / 0.8, -1)
    want = logp.gather(-1, batch.input_ids[:, p : p + t, None]).squeeze(-1)
    torch.testing.assert_close(got.logprobs.detach(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.entropy, -(logp.exp() * logp).sum(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(got.hidden.detach(), out.hidden_states[-1][:, :p], rtol=0, atol=1e-6)


def test_the_memory_formula_of_a_learner_rank():
    from flowrl_async.learner.sharding import bytes_per_rank

    # 7.6e9 parameters over 8 ranks: 0.95e9 each; 4 + 4 + 8 B = 15.2 GB of training state,
    # a bf16 reference 1.9 GB; the chunk: 4 × 4 B × 1024 × 152,064 = 2.49 GB
    got = bytes_per_rank(7_600_000_000, 8, ref_bytes=2, chunk=1024, vocab=152_064)
    assert got["weights"] == got["grads"] == 3.8e9 and got["adamw"] == 7.6e9
    assert got["reference"] == 1.9e9
    assert got["logprob_chunk"] == 16 * 1024 * 152_064
    assert got["total"] == 3.8e9 + 3.8e9 + 7.6e9 + 1.9e9 + 16 * 1024 * 152_064


def test_the_output_layer_stays_float32_under_autocast():
    # autocast would run the matmul in bf16 (~1e-2 off); the chunked head opts out
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 5, 32, generator=g), torch.randn(300, 32, generator=g)
    targets = torch.randint(0, 300, (2, 5), generator=g)
    want, _ = token_logprobs(hidden, weight, None, targets, 1.0, chunk=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = token_logprobs(hidden, weight, None, targets, 1.0, chunk=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
