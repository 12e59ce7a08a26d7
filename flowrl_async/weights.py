"""Weight publication layout and the torch.distributed group both sides share.

A publication is: one int64 tensor with the header's byte length, the msgpack header as a
uint8 tensor (version, probe token ids and the learner's probe log-prob, and for each
bucket its dtype, byte size and the (name, shape, offset) of every parameter in it), then
each bucket as one flat tensor, broadcast from rank 0 in order.

Invariants: buckets hold one dtype each and at most ``bucket_bytes`` unless a single tensor
is larger (then it is alone in its bucket); parameters appear in the order given; the
layout depends only on names, shapes and dtypes, so sender and receiver agree without
negotiation. The group is built from its own TCPStore and never touches torch.distributed's
default group (NCCL on GPU, gloo on CPU).
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import msgpack
import torch
import torch.distributed as dist

DEFAULT_BUCKET_BYTES = 64 * 1024 * 1024
STOP = -1  # a header length of -1 tells receivers the learner is done
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32)
}


@dataclass(frozen=True)
class Slot:
    """Where one named tensor lies in a bucket."""

    name: str
    shape: tuple[int, ...]
    offset: int  # in elements, within its bucket
    numel: int
    index: int  # position in the sender's parameter order


@dataclass(frozen=True)
class Bucket:
    """One broadcast unit: a flat tensor of one dtype and the slots in it."""

    dtype: torch.dtype
    numel: int
    slots: tuple[Slot, ...]


@dataclass(frozen=True)
class Header:
    """What a publication announces before its buckets: version, layout and probe."""

    version: int
    buckets: tuple[Bucket, ...]
    probe_token_ids: tuple[int, ...] = ()
    probe_logprob: float = 0.0

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            {
                "version": self.version,
                "probe": [list(self.probe_token_ids), self.probe_logprob],
                "buckets": [
                    [
                        str(b.dtype).removeprefix("torch."),
                        b.numel,
                        [[s.name, list(s.shape), s.offset, s.numel, s.index] for s in b.slots],
                    ]
                    for b in self.buckets
                ],
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Header:
        obj = msgpack.unpackb(data)
        buckets = tuple(
            Bucket(
                _DTYPES[dtype],
                numel,
                tuple(Slot(n, tuple(shape), off, k, i) for n, shape, off, k, i in slots),
            )
            for dtype, numel, slots in obj["buckets"]
        )
        ids, lp = obj["probe"]
        return cls(obj["version"], buckets, tuple(ids), lp)


def plan_buckets(
    named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> tuple[Bucket, ...]:
    """Group parameters into per-dtype buckets of at most ``bucket_bytes`` each."""
    open_slots: dict[torch.dtype, list[Slot]] = {}
    open_numel: dict[torch.dtype, int] = {}
    done: list[Bucket] = []
    for index, (name, t) in enumerate(named):
        if t.dtype not in _DTYPES.values():
            raise TypeError(f"cannot publish {name} of dtype {t.dtype}")
        slots = open_slots.setdefault(t.dtype, [])
        used = open_numel.get(t.dtype, 0)
        if slots and (used + t.numel()) * t.element_size() > bucket_bytes:
            done.append(Bucket(t.dtype, used, tuple(slots)))
            slots, used = [], 0
            open_slots[t.dtype] = slots
        slots.append(Slot(name, tuple(t.shape), used, t.numel(), index))
        open_numel[t.dtype] = used + t.numel()
    for dtype, slots in open_slots.items():
        if slots:
            done.append(Bucket(dtype, open_numel[dtype], tuple(slots)))
    return tuple(done)


def pack_bucket(
    bucket: Bucket, tensors: dict[str, torch.Tensor], out: torch.Tensor | None = None
) -> torch.Tensor:
    flat = torch.empty(bucket.numel, dtype=bucket.dtype) if out is None else out
    for s in bucket.slots:
        flat[s.offset : s.offset + s.numel].copy_(tensors[s.name].detach().reshape(-1))
    return flat


def bucket_view(bucket: Bucket, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The bucket as one flat view when its tensors already lie back to back in one storage
    exactly as the bucket lays them out (see ``share_storage``); None otherwise (pack it)."""
    first = tensors[bucket.slots[0].name]
    storage = first.untyped_storage()
    start = first.storage_offset() - bucket.slots[0].offset
    if start < 0:
        return None
    for s in bucket.slots:
        t = tensors[s.name]
        if (
            t.dtype != bucket.dtype
            or t.device != first.device
            or not t.is_contiguous()
            or t.untyped_storage().data_ptr() != storage.data_ptr()
            or t.storage_offset() != start + s.offset
        ):
            return None
    return first.new_empty(0).set_(storage, start, (bucket.numel,))


def share_storage(
    named: list[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> int:
    """Move the tensors of ``named`` (e.g. ``module.state_dict(keep_vars=True).items()``, in
    the order they are published) into one flat tensor per publication bucket, so a
    publication sends them where they are, without the packing copy. The tensor objects stay
    the same (their ``.data`` moves: parameters keep working with an optimizer); a bucket
    holding a tensor that appears under two names (tied weights) is left alone and packed as
    before. -> the number of buckets now sent in place."""
    names_per_tensor = Counter(id(t) for _, t in named)
    tensors = dict(named)
    moved = 0
    for bucket in plan_buckets(named, bucket_bytes):
        members = [tensors[s.name] for s in bucket.slots]
        if any(names_per_tensor[id(t)] > 1 for t in members):
            continue
        flat = torch.empty(bucket.numel, dtype=bucket.dtype, device=members[0].device)
        for s, t in zip(bucket.slots, members, strict=True):
            view = flat[s.offset : s.offset + s.numel].view(s.shape)
            view.copy_(t.data)
            t.data = view
        moved += 1
    return moved


def unpack(
    buckets: Iterable[Bucket], flats: Iterable[torch.Tensor]
) -> list[tuple[str, torch.Tensor]]:
    """Views into the received flat buckets: (name, tensor) in the sender's order."""
    items = [
        (s.index, s.name, flat[s.offset : s.offset + s.numel].view(s.shape))
        for bucket, flat in zip(buckets, flats, strict=True)
        for s in bucket.slots
    ]
    return [(name, t) for _, name, t in sorted(items, key=lambda item: item[0])]


def new_group(
    host: str,
    port: int,
    rank: int,
    world_size: int,
    backend: str = "gloo",
    timeout_s: float = 600.0,
) -> dist.ProcessGroup:
    """A process group of its own (rank 0 hosts the TCPStore); the default group is untouched."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False
    )
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    raise ValueError(f"unknown weight-sync backend {backend!r}; expected gloo or nccl")


def broadcast(group: dist.ProcessGroup, tensor: torch.Tensor, root: int = 0, wait: bool = True):
    """Broadcast ``tensor`` from ``root``; with wait=False -> the work handle to wait on."""
    opts = dist.BroadcastOptions()
    opts.rootRank = root
    work = group.broadcast([tensor], opts)
    if wait:
        work.wait()
        return None
    return work


PROBE_PER_TOKEN = {"float32": 0.0, "bfloat16": 5e-2, "float16": 1e-2}  # 16-bit rounding


def probe_tolerance(base: float, dtype: str, tokens: int) -> float:
    """The largest accepted gap between an actor's and the learner's probe log-prob (a sum
    over ``tokens`` tokens): ``base`` in float32; in a 16-bit dtype at least a per-token
    allowance for its rounding times the probe's length."""
    return max(base, PROBE_PER_TOKEN.get(dtype, 5e-2) * tokens)
