"""Learner ranks side by side: per-rank training-state memory and step time at 1 vs 2 ranks
(FSDP2 over gloo, separate processes, one thread each) on the same batch.

Memory is counted exactly from the tensors each rank holds (its shards of the parameters,
their gradients and AdamW's two moments; the frozen reference's shards apart), not from RSS.
The model is Qwen2-shaped (``--hidden``, ``--layers``, ``--vocab``; random weights).

    .venv/bin/python benchmarks/learner_scaling.py --steps 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time

import _common  # noqa: F401 - one thread per process, before torch
import torch


def make_model(path: str, hidden: int, layers: int, vocab: int) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
                      vocab_size=vocab, tie_word_embeddings=False, max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def batch(vocab: int, groups: int = 4, n: int = 4, tokens: int = 64):
    import numpy as np

    from flowrl_async.records import Group, Response
    from flowrl_async.replay.client import SampleInfo

    g = np.random.default_rng(0)
    out = []
    for k in range(groups):
        responses = tuple(
            Response(g.integers(3, vocab, tokens).astype(np.int32),
                     g.uniform(-3, -0.5, tokens).astype(np.float32), float(j % 2), "stop", 0, 0, "ok")
            for j in range(n)
        )  # fmt: skip
        out.append(Group(f"g{k}", k, g.integers(3, vocab, 16).astype(np.int32), "x", responses))
    return out, [SampleInfo(1, 0, 0.0)] * groups


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def rank_main(model_dir, vocab, steps, rank, world, port, queue):
    _common.one_thread()
    from flowrl_async.learner.config import AlgoConfig
    from flowrl_async.learner.learner import Learner
    from flowrl_async.learner.log_z import LogZHead
    from flowrl_async.learner.sharding import Ranks
    from flowrl_async.model import load_policy

    ranks = Ranks.join("127.0.0.1", port, rank, world) if world > 1 else None
    policy, ref = load_policy(model_dir), load_policy(model_dir)
    head = LogZHead(policy.config.hidden_size)
    groups, infos = batch(vocab)
    learner = Learner(policy, ref, head, AlgoConfig(beta=1.0), lambda b, v: (groups, infos),
                      pad_token_id=0, batch_groups=len(groups), micro_batch=8, logprob_chunk=256,
                      ranks=ranks)  # fmt: skip
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        learner.step()
        times.append(time.perf_counter() - t0)
    params = list(learner.policy.parameters())
    moments = [v for s in learner.optimizer.state.values() for k, v in s.items() if k != "step"]
    report = {
        "rank": rank,
        "params": local_bytes(params),
        "grads": local_bytes(p.grad for p in params),
        "optimizer": local_bytes(moments),
        "reference": local_bytes(learner.ref.parameters()),
        "step_s": _common.median(times[1:] or times),
    }
    queue.put(report)


def run(model_dir: str, vocab: int, steps: int, world: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _common.free_port()
    procs = [ctx.Process(target=rank_main, args=(model_dir, vocab, steps, r, world, port, queue))
             for r in range(world)]  # fmt: skip
    for p in procs:
        p.start()
    reports = [queue.get(timeout=1800) for _ in range(world)]
    for p in procs:
        p.join()
    return sorted(reports, key=lambda r: r["rank"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32_000)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(f"{tmp}/m", a.hidden, a.layers, a.vocab)
        one, two = run(model_dir, a.vocab, a.steps, 1), run(model_dir, a.vocab, a.steps, 2)
    mb = 2**20
    rows = []
    for name, reports in (("1 rank", one), ("2 ranks", two)):
        for r in reports:
            state = r["params"] + r["grads"] + r["optimizer"]
            rows.append((f"{name}, rank {r['rank']}", f"{state / mb:.1f}", f"{r['reference'] / mb:.1f}",
                         f"{r['step_s']:.3f}"))  # fmt: skip
    print(_common.table(("learner", "params+grads+AdamW MB", "reference MB", "step s"), rows,
                        (18, 22, 13, 8)))  # fmt: skip
    per_rank = max(r["params"] + r["grads"] + r["optimizer"] for r in two)
    single = one[0]["params"] + one[0]["grads"] + one[0]["optimizer"]
    print(
        f"\nper-rank training state at 2 ranks / 1 rank: {per_rank / single:.3f} (target <= 0.55)"
    )
    print(f"step time at 2 ranks / 1 rank: {two[0]['step_s'] / one[0]['step_s']:.2f}")


if __name__ == "__main__":
    main()
