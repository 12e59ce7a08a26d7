"""Generators: behaviour log-probs equal teacher-forced ones; loads follow the new weights."""

import numpy as np
import pytest
import torch

from flowrl_async.actors.generator import SampleSpec, WeightLoadError, check_probe
from flowrl_async.actors.torch_generator import TorchGenerator, nucleus_logprobs
from flowrl_async.model import build_tiny_model, load_policy, load_tokenizer

PROMPTS = [[1, 33, 35, 27, 4, 9, 4], [1, 20, 21]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return build_tiny_model(root / "a", seed=0), build_tiny_model(root / "b", seed=1)


def teacher_forced(model, prompt, completion, temperature):
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None]).squeeze(-1)


def check_against_transformers(gen, path, temperature, tol):
    model = load_policy(path)
    out = gen.generate(
        PROMPTS, SampleSpec(n=3, temperature=temperature, top_p=1.0, max_tokens=6, seed=5)
    )
    assert [len(g) for g in out] == [3, 3]
    for prompt, group in zip(PROMPTS, out, strict=True):
        for c in group:
            assert c.token_ids.dtype == np.int32 and c.logprobs.dtype == np.float32
            assert len(c.token_ids) == len(c.logprobs) > 0
            assert c.finish_reason in ("stop", "length")
            expected = teacher_forced(model, prompt, c.token_ids.tolist(), temperature)
            np.testing.assert_allclose(c.logprobs, expected.numpy(), atol=tol, rtol=0)
    return out


def test_torch_generator_logprobs_and_loads(models):
    a, b = models
    tok = load_tokenizer(a)
    gen = TorchGenerator(load_policy(a), tok.eos_token_id, tok.pad_token_id)
    check_against_transformers(gen, a, temperature=0.7, tol=1e-5)
    probe = PROMPTS[0]
    before = gen.probe_logprob(probe)
    gen.load_weights(load_policy(b).state_dict().items())
    check_against_transformers(gen, b, temperature=1.0, tol=1e-5)
    after = check_probe(
        gen, probe, teacher_forced(load_policy(b), probe[:1], probe[1:], 1.0).sum().item(), 1e-4
    )
    assert abs(after - before) > 1e-3
    with pytest.raises(WeightLoadError, match="probe log-prob"):
        check_probe(gen, probe, before, 1e-4)


def test_nucleus_logprobs_renormalise_over_the_kept_tokens():
    # probabilities 0.5, 0.3, 0.2: top_p 0.7 keeps 0.5 and 0.3 (mass before 0.3 is 0.5 < 0.7,
    # before 0.2 it is 0.8 >= 0.7) -> 0.625, 0.375, 0
    lp = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    out = nucleus_logprobs(lp, 0.7).exp()
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.625, 0.375]]), atol=1e-6, rtol=0)


@pytest.mark.integration
def test_vllm_generator_matches_transformers_and_follows_loads(models):
    from flowrl_async.actors.vllm_generator import VLLMGenerator

    a, b = models
    # a checkpoint's own sampling defaults (Qwen's ship top_k and a repetition penalty) must
    # not reach the engine: its log-probs stay the plain softmax the learner computes
    (a / "generation_config.json").write_text(
        '{"top_k": 2, "min_p": 0.3, "repetition_penalty": 1.8, "max_new_tokens": 2}'
    )
    gen = VLLMGenerator(str(a), max_model_len=64)
    check_against_transformers(gen, a, temperature=0.7, tol=1e-4)
    probe = PROMPTS[0]
    expected_a = teacher_forced(load_policy(a), probe[:1], probe[1:], 1.0).sum().item()
    check_probe(gen, probe, expected_a, 1e-4)
    gen.load_weights(load_policy(b).state_dict().items())
    check_against_transformers(gen, b, temperature=1.0, tol=1e-4)
    expected_b = teacher_forced(load_policy(b), probe[:1], probe[1:], 1.0).sum().item()
    check_probe(gen, probe, expected_b, 1e-4)
    # a wrong load is caught: the learner says "b" but the engine now holds "a"
    gen.load_weights(load_policy(a).state_dict().items())
    with pytest.raises(WeightLoadError):
        check_probe(gen, probe, expected_b, 1e-4)
    streams_across_a_load(gen, load_policy(a), load_policy(b), expected_b)


def streams_across_a_load(gen, old, new, expected_new):
    """Streaming (actors/streaming.py) on vLLM: a group submitted under ``old`` weights,
    three engine steps, a load of ``new`` (and its probe) mid-flight, then on to the end.
    The engine's progress at the load says three tokens each came from the old weights
    (prefill, then tokens 0 and 1 fed under them); each token's recorded log-prob is what
    vLLM sampled it with: from token 3 on, the new weights over the old weights' keys and
    values for the prompt and tokens 0, 1 (KV kept)."""
    spec = SampleSpec(n=2, temperature=1.0, top_p=1.0, max_tokens=10, seed=3)
    prompt = PROMPTS[0]
    long_prompt = [1] + [20, 21, 22, 23] * 12  # whole KV blocks: the prefix cache keeps them
    gen.generate([long_prompt], spec)  # cached under the old weights
    gen.submit("g", prompt, spec)
    for _ in range(3):
        assert gen.step() == []
    gen.load_weights(new.state_dict().items())
    assert gen.progress() == {"g": [3, 3]}  # the switch: tokens 0-2 old, 3 on new
    check_probe(gen, prompt, expected_new, 1e-4)  # through the engine: the group stays
    assert gen.in_flight() == 1
    # vLLM refuses to reset the prefix cache while "g" runs: until a reset succeeds, new
    # requests read no cached block (it may hold the old weights' keys and values)
    assert gen._stale and gen._cache_stale()
    gen.submit("late", long_prompt, spec)
    finished = {}
    while len(finished) < 2:
        finished.update(gen.step())
    for c in finished["late"]:
        expected = teacher_forced(new, long_prompt, c.token_ids.tolist(), 1.0)
        np.testing.assert_allclose(c.logprobs, expected.numpy(), atol=1e-4, rtol=0)
    assert not gen._cache_stale()  # nothing runs now: the reset went through
    group = finished["g"]
    assert len(group) == 2 and gen.in_flight() == 0
    assert any(len(c.token_ids) > 4 for c in group)
    for c in group:
        want = kept_cache_logprobs(old, new, prompt, c.token_ids.tolist(), switch=3)
        np.testing.assert_allclose(c.logprobs, want, atol=1e-4, rtol=0)
        if len(c.token_ids) > 4:  # neither version alone gives the tokens after the load
            for model in (old, new):
                alone = teacher_forced(model, prompt, c.token_ids.tolist(), 1.0).numpy()
                assert not np.allclose(c.logprobs[3:], alone[3:], atol=1e-4)


def kept_cache_logprobs(old, new, prompt, tokens, switch):
    """Tokens before ``switch`` sampled under ``old``; after it, ``new`` over ``old``'s keys
    and values for the prompt and the tokens fed before the switch (computed here)."""
    seq = torch.tensor([list(prompt) + list(tokens)])
    p = len(prompt)
    with torch.no_grad():
        head = old(input_ids=seq[:, : p + switch - 1], use_cache=True)
        tail = new(input_ids=seq[:, p + switch - 1 :], past_key_values=head.past_key_values)
    logits = torch.cat([head.logits[0, p - 1 :], tail.logits[0, :-1]])
    return torch.log_softmax(logits.float(), -1).gather(-1, seq[0, p:, None])[:, 0].numpy()


@pytest.mark.integration
def test_vllm_recompute_samples_every_token_after_a_load_from_the_new_version(models):
    """inflight_kv=recompute on vLLM: the running sequences are preempted and compute their
    prompt and tokens so far again under the new weights, so each token's recorded log-prob
    is teacher forcing of its whole prefix under the version that sampled it."""
    from flowrl_async.actors.vllm_generator import VLLMGenerator

    a, b = models
    old, new = load_policy(a), load_policy(b)
    gen = VLLMGenerator(str(a), max_model_len=64)
    spec = SampleSpec(n=2, temperature=1.0, top_p=1.0, max_tokens=10, seed=4)
    prompt = PROMPTS[1]
    gen.submit("g", prompt, spec)
    for _ in range(4):
        assert gen.step() == []
    gen.load_weights(new.state_dict().items())
    assert gen.progress() == {"g": [4, 4]}
    gen.recompute_in_flight()
    assert not gen._cache_stale()  # the preemption freed every block: the reset went through
    finished = []
    while not finished:
        finished = gen.step()
    ((_, group),) = finished
    assert any(len(c.token_ids) > 5 for c in group)
    for c in group:
        tokens = c.token_ids.tolist()
        assert len(tokens) == len(c.logprobs) <= 10  # nothing sampled twice or dropped
        before = teacher_forced(old, prompt, tokens, 1.0).numpy()
        after = teacher_forced(new, prompt, tokens, 1.0).numpy()
        np.testing.assert_allclose(c.logprobs[:4], before[:4], atol=1e-4, rtol=0)
        np.testing.assert_allclose(c.logprobs[4:], after[4:], atol=1e-4, rtol=0)
        if len(tokens) > 5:  # and not what keeping the cache would have given
            kept = kept_cache_logprobs(old, new, prompt, tokens, switch=4)
            assert not np.allclose(c.logprobs[4:], kept[4:], atol=1e-4)


@pytest.mark.integration
def test_vllm_generator_reloads_a_tied_model_even_without_lm_head_weights(tmp_path):
    # checkpoints of tied models omit lm_head.weight; vLLM's CPU engine then kept its old
    # output layer (probe −17.03 against the true −16.65 in one trial): the generator adds it
    from flowrl_async.actors.vllm_generator import VLLMGenerator

    a = build_tiny_model(tmp_path / "ta", seed=0, tie_word_embeddings=True)
    c = build_tiny_model(tmp_path / "tc", seed=2, tie_word_embeddings=True)
    gen = VLLMGenerator(str(a), max_model_len=64)
    probe = PROMPTS[0]
    state = {k: v for k, v in load_policy(c).state_dict().items() if k != "lm_head.weight"}
    gen.load_weights(state.items())
    expected = teacher_forced(load_policy(c), probe[:1], probe[1:], 1.0).sum().item()
    check_probe(gen, probe, expected, 1e-4)
    check_against_transformers(gen, c, temperature=1.0, tol=1e-4)


def test_sampling_settings_that_reshape_the_distribution_are_refused():
    from vllm import SamplingParams

    from flowrl_async.actors.vllm_generator import check_neutral, sampling_params

    spec = SampleSpec(n=2, temperature=0.7, top_p=1.0, max_tokens=4, seed=1)
    params = sampling_params(spec)  # what the actors send: neutral, passes
    assert (params.n, params.temperature, params.max_tokens, params.logprobs) == (2, 0.7, 4, 0)
    for change in ({"min_tokens": 2}, {"top_k": 5}, {"repetition_penalty": 1.1},
                   {"presence_penalty": 0.5}, {"logit_bias": {3: 2.0}}, {"min_p": 0.1}):  # fmt: skip
        with pytest.raises(ValueError, match=f"{next(iter(change))}.*learner does not"):
            check_neutral(SamplingParams(temperature=0.7, **change))
