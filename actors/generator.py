"""The Generator protocol: what a rollout actor needs from a generation engine.

Invariants every backend keeps:
- ``logprobs[i]`` is log μ(token_ids[i] | prefix) under the distribution actually sampled
  from (temperature applied), float32, one per generated token;
- ``load_weights`` replaces every parameter before it returns, and the next ``generate``
  uses only the new weights (no cached prefix from the old ones);
- ``probe_logprob`` is the summed teacher-forced log-prob (temperature 1) of a token
  sequence after its first token: the learner computes the same number, and the two must
  agree after every load.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from flowrl_async.actors.config import ENGINES


class WeightLoadError(RuntimeError):
    """Loaded weights do not reproduce the learner's probe log-prob."""


@dataclass(frozen=True)
class Completion:
    """One generated response: tokens, behaviour log-probs, finish reason."""

    token_ids: np.ndarray  # int32 [L]
    logprobs: np.ndarray  # float32 [L]
    finish_reason: str  # "stop" (eos) or "length"


@dataclass(frozen=True)
class SampleSpec:
    """What to sample: responses per prompt, temperature, top-p, length, seed."""

    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None = None


class Generator(Protocol):
    """What a rollout actor needs from a generation engine."""

    def generate(
        self, prompts: Sequence[Sequence[int]], spec: SampleSpec
    ) -> list[list[Completion]]:
        """n completions for each prompt (token ids, <bos> included)."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def probe_logprob(self, token_ids: Sequence[int]) -> float: ...


class StreamingGenerator(Generator, Protocol):
    """A Generator the streaming loop (actors/streaming.py) drives one step at a time."""

    stepped_tokens: int  # tokens ``step`` has sampled so far (one per running sequence a step)

    def submit(self, key, prompt: Sequence[int], spec: SampleSpec) -> None:
        """Start ``spec.n`` responses to ``prompt``; ``step`` returns them under ``key``."""
        ...

    def step(self) -> list[tuple[object, list[Completion]]]:
        """One token for every running sequence; -> the groups that finished."""
        ...

    def progress(self) -> dict[object, list[int]] | None:
        """Tokens each response in flight has sampled (None: not known here)."""
        ...

    def recompute_in_flight(self) -> None:
        """Compute the running sequences' keys and values again under the weights now."""
        ...

    def in_flight(self) -> int: ...

    def abort_all(self) -> None: ...


def check_probe(generator: Generator, token_ids: Sequence[int], expected: float, tol: float):
    """Raise WeightLoadError when the engine's probe log-prob differs from the learner's."""
    got = generator.probe_logprob(token_ids)
    if not abs(got - expected) <= tol:
        raise WeightLoadError(
            f"weight load not reproduced: probe log-prob {got:.6f} vs learner's "
            f"{expected:.6f} (gap {abs(got - expected):.2e} > tolerance {tol:.1e})"
        )
    return got


def build_generator(engine: str, model_path: str, seed: int, max_model_len: int, dtype: str,
                    engine_process: bool = False, tensor_parallel_size: int = 1,
                    ) -> Generator:  # fmt: skip
    """The Generator of ``engine`` (one of ENGINES) for the model at ``model_path``."""
    if engine == "vllm":
        from flowrl_async.actors.vllm_generator import VLLMGenerator

        return VLLMGenerator(model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                             engine_process=engine_process,
                             tensor_parallel_size=tensor_parallel_size)  # fmt: skip
    if engine == "torch":
        from flowrl_async.actors.torch_generator import TorchGenerator
        from flowrl_async.model import load_policy, load_tokenizer

        tok = load_tokenizer(model_path)
        model = load_policy(model_path, dtype=getattr(torch, dtype))
        return TorchGenerator(model, tok.eos_token_id, tok.pad_token_id, seed=seed)
    raise ValueError(f"unknown engine {engine!r}; expected one of {ENGINES}")
