"""The built-in tiny model and the one loading path for every model directory.

``build_tiny_model`` writes a Llama-architecture causal LM (untied input/output embeddings by
default) and a character-level tokenizer to a Hugging Face directory, offline. A Llama config
matters: with a Qwen2 config AutoTokenizer swaps in a byte-level pre-tokenizer and silently
drops spaces. ``load_tokenizer`` / ``load_policy`` use the Auto classes only, so the same code
loads the tiny model and any local Hugging Face checkpoint (Qwen, Llama, ...).

Invariants: tokenizers pad on the left; every encoded prompt starts with <bos>; a model
directory is written to a temporary sibling and renamed into place, so a reader never sees a
half-written model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # no "Loading weights" bars in every process's output

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# 60 printable characters; with the 4 special tokens the vocabulary has 64 entries.
CHARACTERS = " 0123456789abcdefghijklmnopqrstuvwxyz=+-*/:,.?!()[]<>#%&$_|;"


def build_char_tokenizer(characters: str = CHARACTERS) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer: one token per character, <bos> prepended."""
    if len(set(characters)) != len(characters):
        raise ValueError("tokenizer characters must be distinct")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in characters:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return as_transformers_tokenizer(tok, model_max_length=4096)


def as_transformers_tokenizer(tok: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    """``tok`` (with SPECIAL_TOKENS) as the project's tokenizers are: <bos> prepended,
    padding on the left."""
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=model_max_length,
    )


def tiny_config(
    vocab_size: int,
    *,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 512,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        torch_dtype="float32",
    )


def _atomic_save(out_dir: Path, save) -> Path:
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def build_tiny_model(
    out_dir: str | Path, *, seed: int = 0, tie_word_embeddings: bool = False, **config_kwargs
) -> Path:
    """Write a randomly initialised tiny Llama model and its tokenizer to ``out_dir``."""
    tokenizer = build_char_tokenizer()
    config = tiny_config(
        len(tokenizer),
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config_kwargs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return save_model(out_dir, model, tokenizer)


def cpu_state(model) -> dict:
    """The state dict on the CPU: saving never makes a second copy on the GPU (weights that
    share one storage per bucket are copied out tensor by tensor by the saver). Sharded
    (DTensor) entries are gathered: a collective every rank of their group joins."""
    return {k: _full(v.detach()).cpu() for k, v in model.state_dict().items()}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def save_model(out_dir: str | Path, model, tokenizer, state: dict | None = None) -> Path:
    """Save model + tokenizer atomically in Hugging Face format (transformers and vLLM load
    it); ``state``: the weights to write (default: the model's own, on the CPU)."""

    def save(tmp: Path) -> None:
        weights = cpu_state(model) if state is None else state
        model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        tokenizer.save_pretrained(tmp)

    return _atomic_save(Path(out_dir), save)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def check_model_dir(path: str | Path, tokenizer: bool = True) -> Path:
    """A local model directory, or a ModelError that names what is missing (never a hub
    lookup: a path that is not a directory is not read as a repository id)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model directory {str(path)!r} does not exist (model.path must be "
                         "a local Hugging Face model directory; nothing is fetched from a hub)")  # fmt: skip
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {str(path)!r} has no config.json")
    if tokenizer and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"model directory {str(path)!r} has no tokenizer files "
                         f"(expected one of {', '.join(TOKENIZER_FILES)})")  # fmt: skip
    return path


class ModelError(FileNotFoundError):
    """A model directory that cannot be loaded, named with what it lacks."""


def load_tokenizer(path: str | Path):
    """Any local Hugging Face tokenizer, left-padded, with a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(str(check_model_dir(path)), local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Any local Hugging Face causal LM, in eval mode (the caller switches to train)."""
    path = check_model_dir(path, tokenizer=False)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return model.to(device).eval()


def sequence_logprob(model, token_ids: list[int] | tuple[int, ...]) -> float:
    """Σ log π(token_t | tokens_<t) for t >= 1 at temperature 1: the weight-load probe."""
    ids = torch.tensor([list(token_ids)], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    return float(torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).sum())
