"""RolloutWorker: the process-level shell around RolloutLoop (wrapped as a Ray actor by the
orchestrator; plain Python here so it is testable without Ray).

A (re)started worker first releases its actor id at the replay service, so positions
granted to a previous incarnation that never arrived are handed out again.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from flowrl_async.actors.generator import SampleSpec, build_generator
from flowrl_async.actors.rollout import RolloutLoop
from flowrl_async.actors.streaming import StreamingLoop
from flowrl_async.heap import freeze_survivors
from flowrl_async.model import load_tokenizer
from flowrl_async.replay.client import ReplayClient
from flowrl_async.tasks import PromptSource, load_task
from flowrl_async.weights import new_group


class RolloutWorker:
    """One rollout actor's process: engine, task, replay client and weight receiver."""

    def __init__(
        self,
        actor_id: int,
        model_path: str,
        task_target: str,
        task_kwargs: dict,
        replay_address: str,
        spec: SampleSpec,
        groups_per_batch: int = 4,
        engine: str = "vllm",
        data_seed: int = 0,
        seed: int = 0,
        threads: int = 1,
        max_model_len: int = 256,
        dtype: str = "float32",
        probe_tolerance: float = 1e-3,
        engine_process: bool = False,
        tensor_parallel_size: int = 1,
        replay_keys: dict | None = None,
        max_in_flight: int | None = None,
        inflight_updates: bool = True,
        inflight_kv: str = "keep",
    ):
        """``replay_keys``: ReplayClient's CURVE keyword arguments (encrypted replay socket);
        ``max_in_flight``: stream (actors/streaming.py) with this many prompts in flight."""
        torch.set_num_threads(threads)
        self.actor_id = actor_id
        self.replay = ReplayClient(replay_address, **(replay_keys or {}))
        self.replay.release(actor_id)
        task = load_task(task_target, **task_kwargs)
        self.generator = build_generator(
            engine,
            model_path,
            seed + actor_id,
            max_model_len,
            dtype,
            engine_process,
            tensor_parallel_size,
        )
        loop, extra = RolloutLoop, {}
        if max_in_flight is not None:
            loop, extra = StreamingLoop, dict(max_in_flight=max_in_flight,
                                              inflight_updates=inflight_updates,
                                              inflight_kv=inflight_kv)  # fmt: skip
        self.loop = loop(
            actor_id,
            self.generator,
            PromptSource(task, seed=data_seed),
            load_tokenizer(model_path),
            self.replay,
            spec,
            groups_per_batch,
            probe_tolerance=probe_tolerance,
            dtype=dtype,
            **extra,
        )
        freeze_survivors()  # the engine and modules: out of the collector's way

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        import os

        return os.getpid()

    def init_weight_group(self, host: str, port: int, rank: int, world: int, backend: str):
        from flowrl_async.actors.weight_receiver import WeightReceiver

        if getattr(self.generator, "engine_process", False):  # received inside vLLM's engine
            with self.loop.engine_lock:  # the LLM object is not safe to use from two threads
                receiver = self.generator.join_weight_group(host, port, rank, world, backend)
            self.loop.receiver = receiver
            return rank
        old = self.loop.receiver
        pool = old.pool if old is not None else None  # keep the allocated buffers
        device = "cuda" if backend == "nccl" else "cpu"  # NCCL receives into GPU memory
        group = new_group(host, port, rank, world, backend)
        self.loop.receiver = WeightReceiver(group, device=device, pool=pool)
        return rank

    def run(self, max_batches: int | None = None) -> dict:
        self.loop.stopped = False
        self.loop.run(max_batches)
        return self.stats()

    def stop(self) -> None:
        self.loop.stopped = True

    def evaluate(self, split: str, samples: int, temperature: float, max_tokens: int) -> dict:
        """Sample ``samples`` completions per prompt of ``split`` with the current weights;
        -> mean metrics prefixed ``eval_`` (accuracy, pass@k, distinct correct, coverage...)."""
        from flowrl_async.tasks.scoring import sample_and_score

        task = self.loop.prompts.task
        prompts = task.eval_prompts if split == "eval" else task.train_prompts
        spec = SampleSpec(samples, temperature, 1.0, max_tokens, seed=0)
        with self.loop.engine_lock:
            means, _, _ = sample_and_score(self.generator, self.loop.tokenizer, task, prompts, spec)
            version = self.loop.version
        return {"eval_version": version, **{f"eval_{k}": v for k, v in means.items()}}

    def stats(self) -> dict:
        out = asdict(self.loop.stats)
        out["rewards"] = dict(self.loop.stats.rewards)
        out["version"] = self.loop.version
        if isinstance(self.loop, StreamingLoop):  # its busy share: time inside engine steps
            loop = self.loop
            n, k, kk, t, kt = loop.step_sums
            out.update(engine_steps=loop.engine_steps, engine_s=loop.engine_s,
                       in_flight=len(loop.pending),
                       open_s=loop.open_s, load_wait_steps_max=loop.load_wait_max,
                       step_n=n, step_k=k, step_kk=kk, step_t=t, step_kt=kt)  # fmt: skip
        return out
