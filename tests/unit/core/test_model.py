"""The offline tiny model and the Auto-class loading path."""

import json

import torch

from flowrl_async.model import CHARACTERS, build_tiny_model, load_policy, load_tokenizer


def test_tiny_model_round_trip(tmp_path):
    path = build_tiny_model(tmp_path / "tiny", seed=3)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is False
    assert config["vocab_size"] == 64  # 4 special tokens + 60 characters
    model = load_policy(path)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n_params < 10_000_000
    # untied: the output layer is its own tensor
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    # the saved weights are the ones loaded back: same seed, same logits
    again = load_policy(build_tiny_model(tmp_path / "again", seed=3))
    ids = torch.tensor([[1, 10, 11, 12]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
        different = load_policy(build_tiny_model(tmp_path / "other", seed=4))
        assert not torch.equal(model(ids).logits, different(ids).logits)


def test_char_tokenizer_round_trip_and_left_padding(tmp_path):
    tok = load_tokenizer(build_tiny_model(tmp_path / "tiny"))
    text = "sum=14 k=3: 5 9 0 (a, b)?"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert len(ids) == 1 + len(text)  # one token per character, spaces kept
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok(CHARACTERS)["input_ids"], skip_special_tokens=True) == CHARACTERS
    batch = tok(["ab", "abcd"], padding=True)
    # "ab" -> <pad> <pad> <bos> a b: padding on the left
    assert batch["input_ids"][0][:2] == [tok.pad_token_id] * 2
    assert batch["input_ids"][0][2] == tok.bos_token_id
    assert batch["attention_mask"][0] == [0, 0, 1, 1, 1]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<eos>"


def test_tied_variant_and_rebuild_replaces_atomically(tmp_path):
    path = build_tiny_model(tmp_path / "m", tie_word_embeddings=True)
    model = load_policy(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    build_tiny_model(tmp_path / "m", tie_word_embeddings=False)
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is False
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp dirs left behind


def test_model_path_errors_name_the_path_and_what_it_lacks(tmp_path):
    import pytest

    from flowrl_async.config import TrainConfig, validate
    from flowrl_async.model import ModelError, build_tiny_model, load_policy, load_tokenizer

    with pytest.raises(ModelError, match="does not exist.*nothing is fetched from a hub"):
        load_policy(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        load_tokenizer(tmp_path / "empty")
    good = build_tiny_model(tmp_path / "m", seed=0)
    for f in good.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            f.unlink()
    with pytest.raises(ModelError, match="has no tokenizer files"):
        load_tokenizer(good)
    cfg = TrainConfig()
    cfg.model.path = str(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"model.path: model directory .*nope' does not exist"):
        validate(cfg)


def test_the_learner_turns_dropout_off(tmp_path):
    # a model configured with attention dropout 0.5: in training mode its forward would be
    # random; the learner's policy gives the same log-probs twice and equals eval mode
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from flowrl_async.learner.batch import collate
    from flowrl_async.learner.config import AlgoConfig
    from flowrl_async.learner.learner import Learner
    from flowrl_async.learner.log_z import LogZHead

    from factories import make_group

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                         attention_dropout=0.5)  # fmt: skip
    torch.manual_seed(0)
    policy, ref = LlamaForCausalLM(config), LlamaForCausalLM(config)
    learner = Learner(policy, ref, LogZHead(64), AlgoConfig(), lambda b, v: None, pad_token_id=0)
    batch = collate([make_group("a", n=3, tokens=5)], [0], pad_token_id=0)
    assert learner.policy.training
    a = learner.policy_fwd(batch, 1.0, False).logprobs
    b = learner.policy_fwd(batch, 1.0, False).logprobs
    policy.eval()
    c = learner.policy_fwd(batch, 1.0, False).logprobs
    assert torch.equal(a, b) and torch.equal(a, c)


def test_dropout_rates_read_at_call_time_are_zeroed_too():
    # OPT keeps its dropout as a float attribute of each layer (config.dropout = 0.1 in real
    # OPT checkpoints); the learner's policy must give the same log-probs twice
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from flowrl_async.learner.batch import collate
    from flowrl_async.learner.config import AlgoConfig
    from flowrl_async.learner.learner import Learner
    from flowrl_async.learner.log_z import LogZHead

    from factories import make_group

    config = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                       vocab_size=64, dropout=0.3, attention_dropout=0.3, layerdrop=0.0,
                       word_embed_proj_dim=32, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    policy, ref = OPTForCausalLM(config), OPTForCausalLM(config)
    learner = Learner(policy, ref, LogZHead(32), AlgoConfig(), lambda b, v: None, pad_token_id=1)
    batch = collate([make_group("a", n=3, tokens=5)], [0], pad_token_id=1)
    a = learner.policy_fwd(batch, 1.0, False).logprobs
    b = learner.policy_fwd(batch, 1.0, False).logprobs
    assert torch.equal(a, b)
    assert policy.config.dropout == 0.3  # the model's own config is left as it is
