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
only where it runs differs.

Tensor parallelism (``generator.tensor_parallel_size`` > 1): only the engine's TP rank 0
joins the weight group and receives; at a load, every TP worker runs ``flowrl_load_latest``
and rank 0 shares what it took over vLLM's own TP group (``share_publication``: the header,
then each bucket, broadcast on the workers' devices), so all workers load the same version
from the same full tensors, and vLLM's weight loaders cut each worker's shard. The weight
group keeps one member per actor whatever the TP size. Memory: every TP worker but rank 0
holds the whole publication once more on its GPU during a load, outside vLLM's
``gpu_memory_utilization`` budget (2 B a parameter in bf16: leave that much free); loading
bucket by bucket is the way to lift it once vLLM's layer-wise reload is known to copy each
tensor before the next arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowrl_async.actors.weight_receiver import WeightLinkError
from flowrl_async.weights import Header

EXTENSION = "flowrl_async.actors.vllm_extension.WeightSyncExtension"
ERROR = b"\xc1"  # never the first byte of a header (msgpack leaves 0xc1 unused)


class WeightSyncExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); methods run in the engine."""

    def flowrl_join(self, host: str, port: int, rank: int, world: int, backend: str) -> int:
        from flowrl_async.actors.weight_receiver import WeightReceiver
        from flowrl_async.weights import new_group

        if _tp_group().rank_in_group != 0:  # TP rank 0 receives for the whole engine
            return rank
        old = getattr(self, "_flowrl_receiver", None)
        pool = old.pool if old is not None else None  # keep the allocated buffers
        device = "cuda" if backend == "nccl" else "cpu"
        group = new_group(host, port, rank, world, backend)
        self._flowrl_receiver = WeightReceiver(group, device=device, pool=pool)
        return rank

    def flowrl_waiting(self) -> bool:
        receiver = getattr(self, "_flowrl_receiver", None)
        return receiver is not None and receiver.waiting()

    def flowrl_load_named(self, named: list) -> None:
        self.reload_weights(weights_iterator=iter(named))

    def flowrl_load_latest(self, tied: bool) -> dict | None:
        """Load the newest complete publication, if any (every TP worker the same one);
        -> its header fields, or None. A broken group -> {"error": message} (the actor
        treats it as a link error)."""
        from flowrl_async.actors.vllm_generator import with_tied_head

        tp = _tp_group()
        got = self._flowrl_take() if tp.rank_in_group == 0 else None
        if tp.world_size > 1:
            got = share_publication(tp, got, torch.device("cuda", torch.cuda.current_device()))
        if got is None or isinstance(got, dict):
            return got
        named = with_tied_head(got.named_tensors(), tied)
        self.reload_weights(weights_iterator=iter(named))
        got.release()
        h = got.header
        return {"version": h.version, "probe": list(h.probe_token_ids), "logprob": h.probe_logprob}

    def _flowrl_take(self):
        """This worker's receiver's newest publication, None, or {"error": ...}."""
        receiver = getattr(self, "_flowrl_receiver", None)
        if receiver is None:
            return None
        try:
            return receiver.take()
        except WeightLinkError as e:
            self._flowrl_receiver = None
            return {"error": str(e)}
        except Exception as e:  # the other TP workers wait in share_publication: tell them
            return {"error": f"{type(e).__name__}: {e}"}


def _tp_group():
    from vllm.distributed.parallel_state import get_tp_group

    return get_tp_group()


def share_publication(tp, got, device):
    """TP rank 0's take (a Publication, None, or {"error": ...}) on every worker of ``tp``
    (``rank_in_group``, ``world_size``, ``broadcast(tensor, src)``, as vLLM's group
    coordinator has them): a length, the header bytes (or the error's), then every bucket,
    broadcast from rank 0 on ``device``. Every worker calls it."""
    from flowrl_async.actors.weight_receiver import Publication

    first = tp.rank_in_group == 0
    data = b""
    if first and isinstance(got, Publication):
        data = got.header.to_bytes()
    elif first and got is not None:
        data = ERROR + got["error"].encode()
    length = torch.tensor([len(data)], dtype=torch.int64, device=device)
    tp.broadcast(length, 0)
    if int(length) == 0:
        return None
    raw = torch.empty(int(length), dtype=torch.uint8, device=device)
    if first:
        raw.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    tp.broadcast(raw, 0)
    data = bytes(raw.cpu().numpy())
    if data.startswith(ERROR):
        return {"error": data[len(ERROR) :].decode()}
    header = Header.from_bytes(data)
    moved = first and any(b.device != device for b in got.buckets)
    if first and not moved:
        buckets = got.buckets  # released by the caller once loaded
    elif first:  # e.g. received over gloo into host memory
        buckets = [b.to(device) for b in got.buckets]
        got.release()
    else:
        buckets = [torch.empty(b.numel, dtype=b.dtype, device=device) for b in header.buckets]
    for flat in buckets:
        tp.broadcast(flat, 0)
    return got if first and not moved else Publication(header, buckets)


@dataclass
class LoadedInEngine:
    """A publication the engine has already loaded; the loop finishes the switch."""

    header: Header

    def load_into(self, generator) -> None:
        generator.weights_changed()


class EngineWeightReceiver:
    """The actor-side face of the extension, with WeightReceiver's ``take`` contract."""

    def __init__(self, generator):
        self.generator = generator

    def waiting(self) -> bool:
        return bool(self.generator.llm.collective_rpc("flowrl_waiting")[0])

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
