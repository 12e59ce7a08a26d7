"""Learner ranks: L processes that shard policy and reference with FSDP2 and train as one.

Rules:
- the ranks form their own torch.distributed group from a TCPStore hosted by rank 0 (gloo on
  CPU, NCCL on GPU). It is the default group of the learner processes: FSDP2's DeviceMesh
  needs a registered group, and nothing else in a learner process uses the default group
  (the weight group to the actors is a group of its own, ``weights.new_group``);
- every decoder layer is one FSDP unit and the policy's forward (``PolicyForward``) the root
  unit, which holds embeddings, final norm and output layer; the frozen reference is sharded
  the same way and has no optimizer state;
- rank 0 samples the step's groups and broadcasts them (the wire codec's bytes, never
  pickle); every rank trains on whole groups of its share; the loss of each rank is divided
  by the step's global row count ÷ L, because FSDP averages gradients over the L ranks: the
  sum is then the 1-rank step's gradient exactly;
- every rank runs the same number of forward/backward passes (a rank with fewer micro-batches
  runs zero-weight ones), since each pass is a collective of the whole group.
"""

from __future__ import annotations

import datetime

import msgpack
import torch
import torch.distributed as dist
from torch import nn

from flowrl_async.replay.client import SampleInfo
from flowrl_async.wire import group_from_wire, group_to_wire


class Ranks:
    """This process's place among the learner ranks, and the collectives the step uses."""

    def __init__(self, rank: int, world: int, device: str = "cpu"):
        self.rank, self.world, self.device = rank, world, device
        self.mesh = None
        if world > 1:
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world,))

    @classmethod
    def join(cls, host: str, port: int, rank: int, world: int, backend: str = "gloo",
             device: str = "cpu", timeout_s: float = 600.0) -> Ranks:  # fmt: skip
        """Form the learner group (rank 0 hosts the TCPStore at host:port)."""
        if world > 1 and not dist.is_initialized():
            timeout = datetime.timedelta(seconds=timeout_s)
            store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout,
                                  wait_for_workers=False)  # fmt: skip
            dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                    timeout=timeout)  # fmt: skip
        return cls(rank, world, device)

    def close(self) -> None:
        """Leave the learner group (before the process exits: its threads must stop first)."""
        if self.sharded and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def share(self, groups: list, infos: list) -> tuple[list, list, slice]:
        """Rank 0's sampled batch on every rank -> (all groups, all infos, this rank's
        groups as a slice: contiguous, whole groups, sizes differing by at most one)."""
        if self.sharded:
            groups, infos = self._broadcast_batch(groups, infos)
        n = len(groups)
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return groups, infos, slice(start, start + base + (1 if self.rank < extra else 0))

    def _broadcast_batch(self, groups, infos):
        if self.rank == 0:
            try:
                batch = {
                    "g": [group_to_wire(g) for g in groups],
                    "i": [[i.times_sampled, i.staleness, i.inserted_at] for i in infos],
                }
                payload = msgpack.packb(batch, use_bin_type=True)
            except BaseException:
                self.abort_share()  # the other ranks wait for the size below
                raise
            size = torch.tensor([len(payload)], dtype=torch.long, device=self.device)
        else:
            size = torch.zeros(1, dtype=torch.long, device=self.device)
        dist.broadcast(size, 0)
        if int(size) < 0:
            raise RuntimeError("learner rank 0 failed before sharing the step's batch")
        data = torch.empty(int(size), dtype=torch.uint8, device=self.device)
        if self.rank == 0:
            data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        dist.broadcast(data, 0)
        if self.rank == 0:
            return groups, infos
        obj = msgpack.unpackb(data.cpu().numpy().tobytes(), raw=False)
        return [group_from_wire(g) for g in obj["g"]], [SampleInfo(*i) for i in obj["i"]]

    def abort_share(self) -> None:
        """Rank 0 could not sample: the other ranks, waiting in ``share``, fail too."""
        if self.sharded and self.rank == 0:
            dist.broadcast(torch.tensor([-1], dtype=torch.long, device=self.device), 0)

    def barrier(self) -> None:
        if self.sharded:
            dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """Whether every rank passed ``ok`` (a collective)."""
        if not self.sharded:
            return ok
        t = torch.tensor([1 if ok else 0], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(int(t))

    def max(self, value: int) -> int:
        if not self.sharded:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Key-wise sums over the ranks (every rank passes the same keys)."""
        if not self.sharded:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist(), strict=True))

    def average_grads(self, params: list[nn.Parameter]) -> None:
        """Average the gradients of replicated (unsharded) parameters, as FSDP does."""
        if not self.sharded:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(self.world)


def shard(forward: nn.Module, decoder_layers, mesh, param_dtype: torch.dtype | None = None):
    """FSDP2: every decoder layer a unit, then ``forward`` (the root: embeddings, final
    norm, output layer). ``param_dtype``: compute dtype (bf16), gradients reduced in fp32,
    fp32 master weights kept by the optimizer."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(forward, mesh=mesh, mp_policy=mp)
    return forward


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered (a collective: every rank calls it); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Buffers:
    """Flat byte buffers kept between publications by role (fresh CPU pages cost ~0.3 s a
    GB to fault in: a publication that allocated its buffers would pay that every time)."""

    def __init__(self):
        self._kept: dict[str, torch.Tensor] = {}

    def get(self, role: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        nbytes = numel * dtype.itemsize
        buf = self._kept.get(role)
        if buf is None or buf.numel() < nbytes or buf.device != torch.device(device):
            buf = self._kept[role] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return buf[:nbytes].view(dtype)


def gather_buckets(state: dict, buckets, keep: bool = True, buffers: Buffers | None = None):
    """-> (bucket, what to send) for each of ``buckets`` (flowrl_async.weights.plan_buckets
    over ``state``), each gathered just before it is yielded. What to send: the bucket as one
    flat tensor in its layout when its entries are FSDP2 shards (gathered to rank 0 in one
    collective, ``_gather_flat``), else {name: full tensor in the bucket's dtype}; None on
    ranks that only join (``keep=False``). Every rank must exhaust the iterator. A yielded
    flat tensor is reused two buckets later: the consumer must be done with it by then
    (``weight_sender.Publication.send`` returns only once the broadcast before is)."""
    buffers = buffers or Buffers()
    for i, bucket in enumerate(buckets):
        entries = [state[s.name].detach() for s in bucket.slots]
        if all(_row_sharded(t) for t in entries):
            yield bucket, _gather_flat(bucket, entries, keep, buffers, i % 2)
            continue
        tensors = {}
        for s, t in zip(bucket.slots, entries, strict=True):
            full = full_tensor(t)
            tensors[s.name] = None if not keep else full.to(bucket.dtype)
            del full
        yield bucket, (tensors if keep else None)


def _row_sharded(t) -> bool:
    """An FSDP2 parameter: a DTensor on a 1-D mesh, split on dim 0 as ``torch.chunk`` does."""
    from torch.distributed.tensor import Shard

    return (
        hasattr(t, "device_mesh") and t.device_mesh.ndim == 1 and tuple(t.placements) == (Shard(0),)
    )


def _rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """The dim-0 rows of a tensor with ``n`` rows that ``rank`` holds (torch.chunk's split)."""
    per = -(-n // world)
    start = min(rank * per, n)
    return start, min(start + per, n)


def _gather_flat(bucket, entries, keep: bool, buffers: Buffers, slot: int):
    """Rank 0 lays its rows of the bucket's tensors out as the bucket and receives every other
    rank's rows, packed, point to point (gloo's gather is ~3x slower than its send/recv):
    -> the flat bucket on rank 0 (``keep``), None elsewhere."""
    world, rank = dist.get_world_size(), dist.get_rank()
    row_numel = [s.numel // s.shape[0] if s.shape and s.shape[0] else 0 for s in bucket.slots]

    def layout(r: int) -> list[tuple[int, int, int]]:  # per slot: (offset, first row, rows)
        out = []
        for s in bucket.slots:
            start, stop = _rows(s.shape[0], r, world) if s.shape else (0, 0)
            out.append((s.offset, start, stop - start))
        return out

    def size(r: int) -> int:
        return sum(n * k for (_, _, n), k in zip(layout(r), row_numel, strict=True))

    device = entries[0].to_local().device
    locals_ = []
    for t, (_, _, count) in zip(entries, layout(rank), strict=True):
        local = t.to_local()
        if local.shape[0] != count:
            raise RuntimeError(f"a shard of {tuple(t.shape)} has {local.shape[0]} rows on rank "
                               f"{rank}, not torch.chunk's {count}")  # fmt: skip
        locals_.append(local.reshape(-1))
    if rank != 0:
        mine = buffers.get("mine", size(rank), bucket.dtype, device)
        _pack(mine, locals_)
        dist.send(mine, dst=0)
        return None
    flat = buffers.get(f"flat{slot}", bucket.numel, bucket.dtype, device)
    parts = {r: buffers.get(f"part{r}", size(r), bucket.dtype, device) for r in range(1, world)}
    works = {r: dist.irecv(part, src=r) for r, part in parts.items()}
    for local, (offset, start, count), k in zip(locals_, layout(0), row_numel, strict=True):
        flat[offset + start * k : offset + (start + count) * k].copy_(local)  # to its dtype
    for r, part in parts.items():
        works[r].wait()
        at = 0
        for (offset, start, count), k in zip(layout(r), row_numel, strict=True):
            flat[offset + start * k : offset + (start + count) * k].copy_(part[at : at + count * k])
            at += count * k
    return flat if keep else None


def _pack(out: torch.Tensor, parts: list[torch.Tensor]) -> None:
    """``parts`` back to back into ``out``, cast to its dtype."""
    at = 0
    for p in parts:
        out[at : at + p.numel()].copy_(p)
        at += p.numel()


def grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The global 2-norm of the parameters' gradients, sharded (DTensor) or not."""
    squares = []
    for p in params:
        if p.grad is None:
            continue
        g = p.grad
        sq = torch.linalg.vector_norm(g.float()) ** 2
        squares.append(full_tensor(sq) if hasattr(sq, "full_tensor") else sq)
    if not squares:
        return torch.zeros(())
    return torch.stack([s.reshape(()) for s in squares]).sum().sqrt()


def clip_grads(params: list[nn.Parameter], max_norm: float) -> float:
    """Scale every gradient by min(1, max_norm / global norm); -> the norm before."""
    total = grad_norm(params)
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(float(scale))
    return float(total)


def bytes_per_rank(n_params: int, ranks: int, ref_bytes: int = 2, chunk: int = 1024,
                   vocab: int = 0) -> dict[str, float]:  # fmt: skip
    """What one learner rank holds, in bytes, before activations: fp32 master weights (4 B a
    parameter), fp32 gradients (4), AdamW's two fp32 moments (8), all sharded over ``ranks``;
    the frozen reference at ``ref_bytes`` a parameter, sharded too; and the output layer's
    chunk (``logprobs.py``): about four [chunk, vocab] float32 tensors live at once."""
    share = n_params / ranks
    out = {
        "weights": 4 * share,
        "grads": 4 * share,
        "adamw": 8 * share,
        "reference": ref_bytes * share,
        "logprob_chunk": 4 * 4 * chunk * vocab,
    }
    out["total"] = sum(out.values())
    return out
