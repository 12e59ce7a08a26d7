"""Weight publication over one gloo group, side by side with one flat broadcast of the same bytes.

One group of ``--world`` real processes (rank 0 = the learner side in this process, ranks
1.. spawned), formed with flowrl_async.weights.new_group. Per repeat, interleaved:

  bucketed   WeightSender.publish (header, then per-dtype buckets of 64 MiB, each packed
             from the parameters into a staging buffer and broadcast) received by
             WeightReceiver's background thread; timed on rank 0 from the start of publish
             until every receiver has taken the complete publication (its main thread polls
             ``take()`` every 0.2 ms and acknowledges over a pipe)
  in place   the same into kept buffers, with the sender's weights living in the publication
             layout (flowrl_async.weights.share_storage, as the learner keeps them): buckets
             go out as they are, with no packing copy
  flat       flowrl_async.weights.broadcast of one preallocated tensor of the same byte
             count on the same group, received into a preallocated tensor; timed the same
             way (acknowledged over a pipe): the raw limit of the group

for two payloads: the tiny model's state dict (float32) and a synthetic Qwen2.5-0.5B-shaped
state dict (~494 M parameters; bfloat16 by default, ~1 GB, because float32 would need
~2 GB per copy and about five copies live at once across the processes of a machine
shared with others; ``--dtype float32`` measures it anyway). Printed: GB/s of both and
the ratio of times bucketed/flat (target <= 1.25x), and the sender's packing time alone
(the copy into staging buffers, the part a flat broadcast does not do).

Actor side: rank 1 holds a VLLMGenerator on the tiny model; after each tiny publication it
times ``load_weights(publication.named_tensors())`` and the probe check (``check_probe``
against the learner's probe log-prob, computed on rank 0 with learner.batch.sequence_logprob).
Publications alternate between two differently seeded tiny models, so every load changes
every weight and the probe proves it. Medians of ``--repeats`` after one warm-up round.

Run: .venv/bin/python benchmarks/weight_broadcast.py [--repeats 7] [--world 2]
     [--dtype bfloat16] [--layers 24]

``--sharded``: the sharded learner's path instead. Two learner ranks (a gloo group of their
own, the synthetic state sharded on dim 0 as FSDP2 shards it) and one receiver: per repeat,
interleaved, (a) the learner's publication (``sharding.gather_buckets``: every rank gathers
one bucket at a time, rank 0 broadcasts it on the weight group while the next is gathered)
until the receiver took it, (b) one flat broadcast of the same bytes from rank 0, and (c)
the gathers alone. Target: (a) <= 1.3x (b).

     .venv/bin/python benchmarks/weight_broadcast.py --sharded [--repeats 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
import warnings
from pathlib import Path

from _common import free_port, median, one_thread, table

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # before configure_vllm_env's default
warnings.filterwarnings("ignore")
POLL_S = 0.0002
PROBE_TEXT = "sum 14 len 3:590"


# ------------------------------------------------------------------------------ payloads
def synthetic_state(dtype, layers: int = 24) -> list[tuple[str, object]]:
    """Qwen2.5-0.5B shapes (tied embeddings): hidden 896, MLP 4864, vocab 151936, 2 KV heads."""
    import torch

    hidden, mlp, vocab, kv = 896, 4864, 151_936, 128
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        pre = f"model.layers.{i}"
        shapes += [
            (f"{pre}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{pre}.self_attn.q_proj.bias", (hidden,)),
            (f"{pre}.self_attn.k_proj.weight", (kv, hidden)),
            (f"{pre}.self_attn.k_proj.bias", (kv,)),
            (f"{pre}.self_attn.v_proj.weight", (kv, hidden)),
            (f"{pre}.self_attn.v_proj.bias", (kv,)),
            (f"{pre}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{pre}.mlp.gate_proj.weight", (mlp, hidden)),
            (f"{pre}.mlp.up_proj.weight", (mlp, hidden)),
            (f"{pre}.mlp.down_proj.weight", (hidden, mlp)),
            (f"{pre}.input_layernorm.weight", (hidden,)),
            (f"{pre}.post_attention_layernorm.weight", (hidden,)),
        ]
    shapes.append(("model.norm.weight", (hidden,)))
    # real pages with distinct values (torch.zeros could hand out untouched zero pages)
    return [
        (name, torch.empty(shape, dtype=dtype).fill_(1.0 + k * 1e-3))
        for k, (name, shape) in enumerate(shapes)
    ]


def nbytes(named) -> int:
    return sum(t.numel() * t.element_size() for _, t in named)


# ------------------------------------------------------------------------------ receivers
def wait_taken(receiver):
    while True:
        pub = receiver.take()
        if pub is not None:
            return pub
        time.sleep(POLL_S)


def receiver_main(rank: int, world: int, port: int, conn, model_dir: str | None) -> None:
    one_thread()
    import torch

    from flowrl_async.actors.generator import check_probe
    from flowrl_async.actors.weight_receiver import WeightReceiver
    from flowrl_async.weights import Header, broadcast, new_group, unpack

    try:
        gen = None
        if model_dir is not None:  # rank 1: the actor's engine
            from flowrl_async.actors.vllm_generator import VLLMGenerator
            from flowrl_async.model import load_tokenizer

            gen = VLLMGenerator(model_dir, max_model_len=64)
            gen.probe_logprob(load_tokenizer(model_dir)(PROBE_TEXT)["input_ids"])  # warm-up
        group = new_group("127.0.0.1", port, rank, world, timeout_s=600)
        conn.send("joined")
        flats: dict[tuple[int, str], torch.Tensor] = {}
        pool: dict[tuple, torch.Tensor] = {}
        last: list[tuple] = []
        receiver_pool: list = []  # released buffers, kept across receivers as an actor does
        while True:
            cmd = conn.recv()
            if cmd[0] == "bucketed":
                receiver = WeightReceiver(group, pool=receiver_pool)
                conn.send("ready")
                pub = wait_taken(receiver)
                conn.send("got")
                if cmd[1] and gen is not None:
                    t0 = time.perf_counter()
                    gen.load_weights(pub.named_tensors())
                    t1 = time.perf_counter()
                    h = pub.header
                    got = check_probe(gen, h.probe_token_ids, h.probe_logprob, 1e-3)
                    t2 = time.perf_counter()
                    conn.send((t1 - t0, t2 - t1, abs(got - h.probe_logprob)))
                pub.release()  # as RolloutLoop does after loading
                del pub
                receiver.stopped.wait(600)  # the sender's STOP ends the receive thread
            elif cmd[0] == "reused":  # the same protocol into buffers kept between rounds
                conn.send("ready")
                length = torch.zeros(1, dtype=torch.int64)
                broadcast(group, length)
                raw = torch.empty(int(length), dtype=torch.uint8)
                broadcast(group, raw)
                header = Header.from_bytes(bytes(raw.numpy()))
                bufs, last = [], [(i, b.numel, b.dtype) for i, b in enumerate(header.buckets)]
                for i, b in enumerate(header.buckets):
                    buf = pool.get((i, b.numel, b.dtype))
                    if buf is None:
                        buf = pool[i, b.numel, b.dtype] = torch.empty(b.numel, dtype=b.dtype)
                        buf.fill_(0)
                    broadcast(group, buf)
                    bufs.append(buf)
                unpack(header.buckets, bufs)  # the named views a Publication hands out
                conn.send("got")
            elif cmd[0] == "touch":  # fresh receive buffers (as WeightReceiver's) vs kept ones
                t0 = time.perf_counter()
                for _, numel, dtype in last:  # the buckets of the last "reused" publication
                    torch.empty(numel, dtype=dtype).fill_(0)
                t1 = time.perf_counter()
                for key in last:
                    pool[key].fill_(0)
                conn.send((t1 - t0, time.perf_counter() - t1))
            elif cmd[0] == "flat":
                _, numel, dtype = cmd
                buf = flats.get((numel, dtype))
                if buf is None:
                    buf = flats[numel, dtype] = torch.empty(numel, dtype=getattr(torch, dtype))
                    buf.fill_(0)
                conn.send("ready")
                broadcast(group, buf)
                conn.send("got")
            else:
                break
    except BaseException as e:
        conn.send(("error", repr(e)))
        raise


# ------------------------------------------------------------------------------ sender
class Rank0:
    def __init__(self, group, conns):
        self.group, self.conns = group, conns

    def expect(self, what: str, conns=None) -> None:
        for c in conns or self.conns:
            msg = c.recv()
            if msg != what:
                raise RuntimeError(f"receiver said {msg!r}, expected {what!r}")

    def bucketed(self, sender, named, version, probe=(), probe_lp=0.0, load=False):
        """-> (seconds until every receiver took it, rank 1's (load_s, probe_s, gap) or None)."""
        for c in self.conns:
            c.send(("bucketed", load))
        self.expect("ready")
        t0 = time.perf_counter()
        sender.publish(named, version, probe, probe_lp)
        self.expect("got")
        seconds = time.perf_counter() - t0
        sender.stop()
        loaded = self.conns[0].recv() if load else None
        if isinstance(loaded, tuple) and loaded and loaded[0] == "error":
            raise RuntimeError(f"rank 1 failed: {loaded[1]}")
        return seconds, loaded

    def reused(self, sender, named, version) -> float:
        """WeightSender.publish received into buffers the receivers keep between rounds."""
        for c in self.conns:
            c.send(("reused",))
        self.expect("ready")
        t0 = time.perf_counter()
        sender.publish(named, version)
        self.expect("got")
        return time.perf_counter() - t0

    def flat(self, buf) -> float:
        from flowrl_async.weights import broadcast

        dtype = str(buf.dtype).removeprefix("torch.")
        for c in self.conns:
            c.send(("flat", buf.numel(), dtype))
        self.expect("ready")
        t0 = time.perf_counter()
        broadcast(self.group, buf)
        self.expect("got")
        return time.perf_counter() - t0


def pack_seconds(named, flat) -> float:
    """The sender's copy into staging alone: pack every bucket into consecutive slices of a
    full-size buffer (fresh pages per bucket, as WeightSender's staging)."""
    from flowrl_async.weights import pack_bucket, plan_buckets

    buckets = plan_buckets(named)
    tensors = dict(named)
    t0 = time.perf_counter()
    offset = 0
    for b in buckets:
        pack_bucket(b, tensors, out=flat[offset : offset + b.numel])
        offset += b.numel
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------ sharded
def learner_rank_main(rank, learner_port, weight_port, dtype, layers, repeats, bucket_bytes,
                      queue):  # fmt: skip
    """One of two learner ranks: shards of the synthetic state; rank 0 also sends."""
    one_thread()
    import torch
    from torch.distributed.tensor import Shard, distribute_tensor

    from flowrl_async.learner.sharding import Buffers, Ranks, gather_buckets
    from flowrl_async.learner.weight_sender import WeightSender
    from flowrl_async.weights import broadcast, new_group, plan_buckets

    ranks = Ranks.join("127.0.0.1", learner_port, rank, 2)
    state = {n: distribute_tensor(t, ranks.mesh, [Shard(0)])
             for n, t in synthetic_state(getattr(torch, dtype), layers)}  # fmt: skip
    specs = [(n, torch.empty(t.shape, dtype=t.dtype, device="meta")) for n, t in state.items()]
    buckets = plan_buckets(specs, bucket_bytes)
    sender = group = None
    if rank == 0:
        group = new_group("127.0.0.1", weight_port, 0, 2, timeout_s=600)
        sender = WeightSender(group, bucket_bytes)
        flat = torch.empty(sum(t.numel() for _, t in specs), dtype=getattr(torch, dtype)).fill_(0.5)
    times = {"sharded": [], "flat": [], "gather": []}
    buffers = Buffers()  # kept between publications, as the learner keeps them
    for r in range(repeats + 1):
        ranks.barrier()
        t0 = time.perf_counter()
        publication = sender.start(buckets, r + 1) if rank == 0 else None
        for bucket, tensors in gather_buckets(state, buckets, rank == 0, buffers):
            if publication is not None:
                publication.send(bucket, tensors)
        if publication is not None:
            publication.finish()
            broadcast(group, torch.zeros(1), root=1)  # the receiver's ack: all of it arrived
        sharded = time.perf_counter() - t0
        ranks.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            broadcast(group, flat)
            broadcast(group, torch.zeros(1), root=1)
        flat_s = time.perf_counter() - t0
        ranks.barrier()
        t0 = time.perf_counter()
        for _ in gather_buckets(state, buckets, rank == 0, buffers):
            pass
        gather = time.perf_counter() - t0
        if r:
            for k, v in (("sharded", sharded), ("flat", flat_s), ("gather", gather)):
                times[k].append(v)
    if rank == 0:
        sender.stop()
        queue.put({k: median(v) for k, v in times.items()} | {"buckets": len(buckets)})
    ranks.close()


def main_sharded(a) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    learner_port, weight_port = free_port(), free_port()
    bucket_bytes = a.bucket_mb * 1024 * 1024
    procs = [ctx.Process(target=learner_rank_main, daemon=True,
                         args=(r, learner_port, weight_port, a.dtype, a.layers, a.repeats,
                               bucket_bytes, queue))
             for r in range(2)]  # fmt: skip
    procs.append(ctx.Process(target=plain_receiver_main, daemon=True,
                             args=(weight_port, a.dtype, a.layers, a.repeats)))  # fmt: skip
    for proc in procs:
        proc.start()
    m = queue.get(timeout=3600)
    for proc in procs:
        proc.join(120)
    import torch

    size = sum(t.numel() * t.element_size()
               for _, t in synthetic_state(getattr(torch, a.dtype), a.layers))  # fmt: skip
    print(f"sharded learner (2 ranks, gloo, one thread each) -> 1 receiver, {size / 1e9:.2f} GB "
          f"{a.dtype} in {m['buckets']} buckets of {a.bucket_mb} MiB, median of {a.repeats}")  # fmt: skip
    rows = [(name, f"{1000 * m[k]:.1f}", f"{size / m[k] / 1e9:.2f}", f"{m[k] / m['flat']:.2f}x")
            for name, k in (("gather + broadcast, bucket by bucket", "sharded"),
                            ("one flat broadcast of the same bytes", "flat"),
                            ("the gathers alone", "gather"))]  # fmt: skip
    print(table(("path", "ms", "GB/s", "x flat"), rows, (38, 8, 6, 7)))
    print(f"target: sharded publication <= 1.3x flat; measured {m['sharded'] / m['flat']:.2f}x")


def plain_receiver_main(weight_port, dtype, layers, repeats) -> None:
    """The receiver: each publication into bucket buffers kept between rounds (as a
    WeightReceiver reuses released ones), then an ack it broadcasts; each flat broadcast
    into a kept tensor, then an ack."""
    one_thread()
    import torch

    from flowrl_async.weights import STOP, Header, broadcast, new_group

    group = new_group("127.0.0.1", weight_port, 1, 2, timeout_s=600)
    n = sum(t.numel() for _, t in synthetic_state(getattr(torch, dtype), layers))
    flat = torch.empty(n, dtype=getattr(torch, dtype)).fill_(0)
    buffers: dict = {}
    for _ in range(repeats + 1):
        length = torch.zeros(1, dtype=torch.int64)  # the publication, as WeightReceiver does
        broadcast(group, length)
        raw = torch.empty(int(length), dtype=torch.uint8)
        broadcast(group, raw)
        header = Header.from_bytes(bytes(raw.numpy()))
        for i, b in enumerate(header.buckets):
            buf = buffers.get(i)
            if buf is None or buf.numel() != b.numel:
                buf = buffers[i] = torch.empty(b.numel, dtype=b.dtype).fill_(0)
            broadcast(group, buf)
        broadcast(group, torch.zeros(1), root=1)  # ack
        broadcast(group, flat)
        broadcast(group, torch.zeros(1), root=1)  # ack
    length = torch.zeros(1, dtype=torch.int64)
    broadcast(group, length)
    assert int(length) == STOP


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--world", type=int, default=2, help="processes in the group (>= 2)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--layers", type=int, default=24, help="layers of the synthetic model")
    p.add_argument("--sharded", action="store_true", help="the sharded learner's path")
    p.add_argument("--bucket-mb", type=int, default=64, help="with --sharded: bucket size")
    a = p.parse_args(argv)
    if a.sharded:
        main_sharded(a)
        return
    one_thread()
    import torch

    from flowrl_async.learner.batch import sequence_logprob
    from flowrl_async.learner.weight_sender import WeightSender
    from flowrl_async.model import build_tiny_model, load_policy, load_tokenizer
    from flowrl_async.weights import new_group, share_storage

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="weights-bench-") as directory:
        dirs = [build_tiny_model(Path(directory) / f"tiny{s}", seed=s) for s in (0, 1)]
        probe = tuple(load_tokenizer(dirs[0])(PROBE_TEXT)["input_ids"])
        tiny = []  # (named tensors, probe log-prob) of both seeds; the engine starts at seed 0
        for d in dirs:
            policy = load_policy(d)
            named = [(n, t.detach()) for n, t in policy.state_dict().items()]
            tiny.append((named, sequence_logprob(policy, probe)))
        big = synthetic_state(getattr(torch, a.dtype), a.layers)
        port = free_port()
        pipes = [ctx.Pipe() for _ in range(1, a.world)]
        procs = [
            ctx.Process(
                target=receiver_main,
                args=(rank, a.world, port, child, str(dirs[0]) if rank == 1 else None),
                daemon=True,
            )
            for rank, (_, child) in enumerate(pipes, start=1)
        ]
        for proc in procs:
            proc.start()
        conns = [parent for parent, _ in pipes]
        t0 = time.perf_counter()
        group = new_group("127.0.0.1", port, 0, a.world, timeout_s=600)
        rank0 = Rank0(group, conns)
        rank0.expect("joined")
        joined = time.perf_counter() - t0
        tiny_sender, big_sender = WeightSender(group), WeightSender(group)
        in_place = []  # copies of both payloads moved into the publication layout
        for named in (tiny[0][0], big):
            kept = [(n, t.clone()) for n, t in named]
            share_storage(kept)
            in_place.append((kept, WeightSender(group)))
        tiny_flat = torch.empty(nbytes(tiny[0][0]) // 4, dtype=torch.float32).fill_(0.5)
        big_flat = torch.empty(sum(t.numel() for _, t in big), dtype=big[0][1].dtype).fill_(0.5)
        keys = ("tiny_r", "tiny_u", "tiny_i", "tiny_f", "big_r", "big_u", "big_i", "big_f",
                "pack", "load", "probe")  # fmt: skip
        times = {k: [] for k in keys + ("fresh", "refill")}
        gaps = []
        version = 0
        for r in range(a.repeats + 1):  # round 0 warms up (plans, staging, buffers)
            version += 1
            named, lp = tiny[version % 2]
            s_tr, (load_s, probe_s, gap) = rank0.bucketed(
                tiny_sender, named, version, probe, lp, load=True
            )
            s_tu = rank0.reused(tiny_sender, named, version)
            s_ti = rank0.reused(in_place[0][1], in_place[0][0], version)
            s_tf = rank0.flat(tiny_flat)
            s_br, _ = rank0.bucketed(big_sender, big, version)
            s_bu = rank0.reused(big_sender, big, version)
            s_bi = rank0.reused(in_place[1][1], in_place[1][0], version)
            s_bf = rank0.flat(big_flat)
            s_pack = pack_seconds(big, big_flat)
            conns[0].send(("touch",))
            fresh, refill = conns[0].recv()
            if r:
                values = (s_tr, s_tu, s_ti, s_tf, s_br, s_bu, s_bi, s_bf, s_pack, load_s, probe_s)
                for k, v in zip(keys, values, strict=True):
                    times[k].append(v)
                times["fresh"].append(fresh)
                times["refill"].append(refill)
                gaps.append(gap)
        for c in conns:
            c.send(("exit",))
        for proc in procs:
            proc.join(60)

    m = {k: median(v) for k, v in times.items()}
    tiny_bytes, big_bytes = nbytes(tiny[0][0]), nbytes(big)
    n_big = sum(t.numel() for _, t in big)
    print(
        f"gloo group of {a.world} processes on loopback (joined in {joined:.1f} s), one thread "
        f"each, 64 MiB buckets, median of {a.repeats}"
    )
    rows = []
    payloads = [
        ("tiny", f"tiny model, float32, {tiny_bytes / 1e6:.1f} MB", tiny_bytes),
        ("big", f"{n_big / 1e6:.0f}M params, {a.dtype}, {big_bytes / 1e9:.2f} GB", big_bytes),
    ]
    for key, label, size in payloads:
        rows.append((label, "", "", ""))
        flat = m[f"{key}_f"]
        for suffix, method in [
            ("r", "WeightSender -> WeightReceiver"),
            ("u", "WeightSender -> reused buffers"),
            ("i", "in place (share_storage) -> reused"),
            ("f", "one flat broadcast"),
        ]:
            s = m[f"{key}_{suffix}"]
            rows.append(
                (f"  {method}", f"{1000 * s:.1f}", f"{size / s / 1e9:.2f}", f"{s / flat:.2f}x")
            )
    print(table(("payload / method", "ms", "GB/s", "x flat"), rows, (40, 8, 6, 7)))
    print(
        "target: publication <= 1.25x flat; measured on the big payload: "
        f"WeightSender -> WeightReceiver {m['big_r'] / m['big_f']:.2f}x, into reused buffers "
        f"{m['big_u'] / m['big_f']:.2f}x, in place (the learner's layout) "
        f"{m['big_i'] / m['big_f']:.2f}x; tiny: {m['tiny_r'] / m['tiny_f']:.2f}x, "
        f"{m['tiny_u'] / m['tiny_f']:.2f}x, {m['tiny_i'] / m['tiny_f']:.2f}x"
    )
    print(
        f"parts ({a.dtype} payload): sender's packing into staging {1000 * m['pack']:.1f} ms; "
        f"rank 1 allocating + first touch of fresh bucket buffers {1000 * m['fresh']:.1f} ms "
        f"(refilling kept ones: {1000 * m['refill']:.1f} ms)"
    )
    print(
        f"actor side (rank 1, VLLMGenerator on the tiny model): load_weights "
        f"{1000 * m['load']:.1f} ms, probe check {1000 * m['probe']:.1f} ms, "
        f"probe gap max {max(gaps):.1e} (tolerance 1e-3)"
    )


if __name__ == "__main__":
    main()
