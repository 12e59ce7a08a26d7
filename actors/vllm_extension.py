"""Weights received inside vLLM's engine process: a worker extension plus ``collective_rpc``.

When vLLM runs its engine in a process of its own (its default on GPU, and the only way with
CUDA graphs and multiprocess executors), the actor cannot touch the model. Then the weight
group member is the engine's worker itself:

    actor process                              engine process (vLLM worker + this extension)
    generator.join_weight_group(...)  ──rpc──► flowrl_join: new_group + WeightReceiver
                                               (background thread, buffers on the worker's
                                               device: CUDA with NCCL, CPU with gloo)
    receiver.take()  (between batches) ──rpc──► flowrl_load_latest: newest complete
                                               publication → reload_weights → release buffers
    publication.load_into(generator)           (reset the prefix cache; the loop then proves
                                               the load with the probe, as in-process)

The receiving, bucket layout, double buffering and probe are the same code as the
in-process path (``weight_receiver.WeightReceiver``, ``weights.unpack``, ``check_probe``);
only where it runs differs. One worker per engine (tensor_parallel_size 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from flowrl_async.actors.weight_receiver import WeightLinkError
from flowrl_async.weights import Header

EXTENSION = "flowrl_async.actors.vllm_extension.WeightSyncExtension"


class WeightSyncExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); methods run in the engine."""

    def flowrl_join(self, host: str, port: int, rank: int, world: int, backend: str) -> int:
        from flowrl_async.actors.weight_receiver import WeightReceiver
        from flowrl_async.weights import new_group

        old = getattr(self, "_flowrl_receiver", None)
        pool = old.pool if old is not None else None  # keep the allocated buffers
        device = "cuda" if backend == "nccl" else "cpu"
        group = new_group(host, port, rank, world, backend)
        self._flowrl_receiver = WeightReceiver(group, device=device, pool=pool)
        return rank

    def flowrl_load_named(self, named: list) -> None:
        self.reload_weights(weights_iterator=iter(named))

    def flowrl_load_latest(self, tied: bool) -> dict | None:
        """Load the newest complete publication, if any; -> its header fields, or None.
        A broken group -> {"error": message} (the actor treats it as a link error)."""
        from flowrl_async.actors.vllm_generator import with_tied_head

        receiver = getattr(self, "_flowrl_receiver", None)
        if receiver is None:
            return None
        try:
            publication = receiver.take()
        except WeightLinkError as e:
            self._flowrl_receiver = None
            return {"error": str(e)}
        if publication is None:
            return None
        named = with_tied_head(publication.named_tensors(), tied)
        self.reload_weights(weights_iterator=iter(named))
        publication.release()
        h = publication.header
        return {"version": h.version, "probe": list(h.probe_token_ids), "logprob": h.probe_logprob}


@dataclass
class LoadedInEngine:
    """A publication the engine has already loaded; the loop finishes the switch."""

    header: Header

    def load_into(self, generator) -> None:
        generator.llm.reset_prefix_cache()


class EngineWeightReceiver:
    """The actor-side face of the extension, with WeightReceiver's ``take`` contract."""

    def __init__(self, generator):
        self.generator = generator

    def take(self) -> LoadedInEngine | None:
        results = self.generator.llm.collective_rpc(
            "flowrl_load_latest", args=(self.generator.tied,)
        )
        got = results[0]
        if got is None:
            return None
        if "error" in got:
            raise WeightLinkError(f"engine weight receiver failed: {got['error']}")
        return LoadedInEngine(Header(got["version"], (), tuple(got["probe"]), got["logprob"]))
