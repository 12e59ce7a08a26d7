"""Peak memory of one learner step vs response length T, chunked vs unchunked output layer,
with and without gradient checkpointing, side by side in one run.

The model is the Qwen2-0.5B shape (hidden 896, vocabulary 151,936, tied embeddings) cut to
``--layers`` decoder layers, since CPU time forbids all 24: the vocabulary term, which
chunking bounds, does not depend on depth; the layers' activations, which checkpointing
bounds, grow with it. One step = FlowRL (policy + reference forward, backward, AdamW) on one
group of two responses of T tokens, one response per micro-batch, bf16 compute as a real
run has (the output layer in fp32). Every configuration runs
in a fresh process; its figure is the growth of peak RSS during the measured step, after a
warm-up step at T = 16 made the optimizer state (on CUDA: ``max_memory_allocated``).

    .venv/bin/python benchmarks/learner_memory.py                 # ~10 min on 1 CPU thread
    .venv/bin/python benchmarks/learner_memory.py --lengths 256 1024 --layers 1
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time

import _common  # noqa: F401 - one thread per process, before torch

UNCHUNKED_MAX_T = 2048  # beyond it the [T, V] float32 logits and their copies pass ~10 GB


def peak_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def one_config(model_dir, t, chunk, checkpointing, dtype, device, queue):
    _common.one_thread()
    import numpy as np
    import torch

    from flowrl_async.learner.config import AlgoConfig
    from flowrl_async.learner.learner import Learner
    from flowrl_async.learner.log_z import LogZHead
    from flowrl_async.model import load_policy
    from flowrl_async.records import Group, Response
    from flowrl_async.replay.client import SampleInfo

    policy = load_policy(model_dir, device=device)
    ref = load_policy(model_dir, dtype=getattr(torch, dtype), device=device)
    if checkpointing:
        policy.gradient_checkpointing_enable({"use_reentrant": False})
    rng = np.random.default_rng(0)
    vocab = policy.config.vocab_size

    def group(tokens):  # two responses: the group-normalised reward is not zero
        responses = tuple(
            Response(rng.integers(3, vocab, tokens).astype(np.int32),
                     np.full(tokens, -2.0, np.float32), float(j), "stop", 0, 0, "ok")
            for j in range(2)
        )  # fmt: skip
        return [Group(f"g{tokens}", 0, rng.integers(3, vocab, 16).astype(np.int32), "x",
                      responses)], [SampleInfo(1, 0, 0.0)]  # fmt: skip

    learner = Learner(policy, ref, LogZHead(policy.config.hidden_size).to(device),
                      AlgoConfig(beta=1.0), None, pad_token_id=0, batch_groups=1,
                      micro_batch=1, logprob_chunk=chunk, device=device,
                      param_dtype=None if dtype == "float32" else getattr(torch, dtype))  # fmt: skip
    learner.train_on(*group(16))  # AdamW's state exists from here on
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before = peak_bytes(device)
    started = time.perf_counter()
    learner.train_on(*group(t))
    queue.put({"grow": peak_bytes(device) - before, "s": time.perf_counter() - started})


def measure(model_dir, t, chunk, checkpointing, dtype, device) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=one_config,
                       args=(model_dir, t, chunk, checkpointing, dtype, device, queue))  # fmt: skip
    proc.start()
    out = queue.get(timeout=3600)
    proc.join()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048, 4096, 8192])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    from flowrl_async.qwen2_shape import build_qwen2_shape

    configs = [("chunked", a.chunk, False), ("chunked + ckpt", a.chunk, True),
               ("unchunked", None, False), ("unchunked + ckpt", None, True)]  # fmt: skip
    rows, grow = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_qwen2_shape(f"{tmp}/m", ["sum 4 len 3: 121"], layers=a.layers))
        for t in a.lengths:
            for name, chunk, ckpt in configs:
                if chunk is None and t > UNCHUNKED_MAX_T:
                    continue
                r = measure(model_dir, t, chunk, ckpt, a.dtype, a.device)
                grow[name, t] = r["grow"]
                rows.append((str(t), name, f"{r['grow'] / 2**20:.0f}", f"{r['s']:.1f}"))
                print(rows[-1], flush=True)
    print()
    print(_common.table(("T", "output layer", "step peak growth MB", "step s"), rows,
                        (6, 18, 20, 8)))  # fmt: skip
    mb = 2**20
    for name in ("chunked", "chunked + ckpt", "unchunked", "unchunked + ckpt"):
        ts = [t for t in a.lengths if (name, t) in grow]
        if len(ts) >= 2:
            lo, hi = ts[0], ts[-1]
            per_token = (grow[name, hi] - grow[name, lo]) / (hi - lo) / 1024
            print(f"{name}: {grow[name, lo] / mb:.0f} MB at T={lo} -> {grow[name, hi] / mb:.0f} MB "
                  f"at T={hi}: {per_token:.1f} KB per token")  # fmt: skip
    vocab_term = 4 * 4 * a.chunk * 151_936 / mb
    print(f"vocabulary term by the formula (bytes_per_rank): chunk {a.chunk}: {vocab_term:.0f} MB "
          f"whatever T; unchunked: {4 * 4 * 151_936 / 1024:.0f} KB per token")  # fmt: skip


if __name__ == "__main__":
    main()
