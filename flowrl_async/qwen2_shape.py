"""A Qwen2-architecture model with the shapes of Qwen2.5-0.5B and random weights, built
offline, with a byte-level BPE tokenizer trained on the task's own text.

It rehearses the scale a real run has (494M parameters, a 151,936-entry vocabulary, tied
embeddings, grouped-query attention) where no checkpoint can be downloaded. Rules:
- the shapes are Qwen2.5-0.5B's (``QWEN2_0P5B``); ``layers`` may cut the depth for tests;
- the tokenizer's merges are learned from the task's text (a few hundred tokens), and its
  vocabulary is filled up to the model's with byte strings no merge produces: every id the
  model can sample decodes, and text encodes as it would with the merges alone;
- prompts start with ``<bos>`` and pad on the left, as the tiny model's do.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from flowrl_async.model import SPECIAL_TOKENS, as_transformers_tokenizer, save_model

QWEN2_0P5B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151_936,
    tie_word_embeddings=True,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
)


def build_bpe_tokenizer(texts: list[str], vocab_size: int = 512,
                        fill_to: int | None = None) -> PreTrainedTokenizerFast:  # fmt: skip
    """Byte-level BPE trained on ``texts`` with ``vocab_size`` entries, its vocabulary then
    filled to ``fill_to`` ids; every byte is in the base alphabet, so any text encodes;
    <bos> is prepended."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    if fill_to is not None:
        tok = _filled(tok, fill_to)
    return as_transformers_tokenizer(tok, model_max_length=32_768)


def _filled(tok: Tokenizer, size: int) -> Tokenizer:
    """``tok`` with vocabulary entries added up to ``size`` ids: two- and three-character
    strings of the byte-level alphabet that are not tokens yet (no merge makes them)."""
    import itertools
    import json

    obj = json.loads(tok.to_str())
    vocab = obj["model"]["vocab"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    fillers = itertools.chain(
        ("".join(p) for p in itertools.product(alphabet, repeat=2)),
        ("".join(p) for p in itertools.product(alphabet, repeat=3)),
    )
    taken = set(vocab) | {t["content"] for t in obj["added_tokens"]}
    next_id = max([*vocab.values(), *(t["id"] for t in obj["added_tokens"])]) + 1
    for text in fillers:
        if next_id >= size:
            break
        if text not in taken:
            vocab[text] = next_id
            next_id += 1
    return Tokenizer.from_str(json.dumps(obj))


def build_qwen2_shape(out_dir: str | Path, texts: list[str], *, seed: int = 0,
                      layers: int | None = None, max_position_embeddings: int = 4096,
                      ) -> Path:  # fmt: skip
    """Write the model (float32 weights, random) and its tokenizer to ``out_dir``."""
    tokenizer = build_bpe_tokenizer(texts, fill_to=QWEN2_0P5B["vocab_size"])
    shape = dict(QWEN2_0P5B, num_hidden_layers=layers or QWEN2_0P5B["num_hidden_layers"])
    config = Qwen2Config(
        **shape,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return save_model(out_dir, model, tokenizer)


def task_texts(task, limit: int = 2000) -> list[str]:
    """Text to train the tokenizer on: the task's prompts and, where it has them, example
    answers."""
    import random

    rng = random.Random(0)
    prompts = list(task.train_prompts)[:limit]
    texts = [p.text for p in prompts]
    if hasattr(task, "format_example"):
        texts += [task.format_example(p, rng) for p in prompts]
    return texts
