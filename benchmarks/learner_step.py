"""Learner step time of FlowRL vs GRPO vs REINFORCE on the same fixed batch.

On the built-in tiny model (built into a temporary directory), one process, one thread: one
fixed batch of G groups × n responses, sampled once by TorchGenerator from digit-task prompts
(temperature 1, up to max_tokens tokens, stopping at EOS; rewards drawn at random, since the
untrained model rarely answers and the step time does not depend on them). Three Learners
(learner/learner.py) with the same settings, each with its own policy, reference policy and
log Z head, train on that batch through a sample_fn that returns it every time. Every step
computes the policy's and the reference policy's log-probs; FlowRL also returns the last
hidden states and runs the log Z head on them. Each learner is warmed up, then the steps are
interleaved (the order rotates every repeat) and the median of Learner.step's wall time is
reported, with ratios to GRPO (target: flowrl/grpo <= 1.15x).

Run: .venv/bin/python benchmarks/learner_step.py [--groups 8] [--n 8] [--max-tokens 32]
     [--micro-batch 64] [--repeats 15]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

from _common import median, one_thread, table, timed

warnings.filterwarnings("ignore")
ALGOS = ("flowrl", "grpo", "reinforce", "vargrad")


def fixed_batch(model_dir, groups: int, n: int, max_tokens: int, seed: int = 0):
    import numpy as np

    from flowrl_async.actors.generator import SampleSpec
    from flowrl_async.actors.torch_generator import TorchGenerator
    from flowrl_async.model import load_policy, load_tokenizer
    from flowrl_async.records import Group, Response, SamplingParams
    from flowrl_async.tasks import PromptSource
    from flowrl_async.tasks.digits import DigitSumTask

    tok = load_tokenizer(model_dir)
    gen = TorchGenerator(load_policy(model_dir), tok.eos_token_id, tok.pad_token_id, seed=seed)
    source = PromptSource(DigitSumTask(), seed=seed)
    prompts = [source.at(i) for i in range(groups)]
    ids = [tok(p.text)["input_ids"] for p in prompts]
    spec = SampleSpec(n=n, temperature=1.0, top_p=1.0, max_tokens=max_tokens)
    rng = np.random.default_rng(seed)
    batch = []
    for k, (prompt, prompt_ids, completions) in enumerate(
        zip(prompts, ids, gen.generate(ids, spec), strict=True)
    ):
        responses = tuple(
            Response(c.token_ids, c.logprobs, float(rng.random()), c.finish_reason, 0, 0, "x")
            for c in completions
        )
        batch.append(
            Group(
                f"g{k}",
                prompt.prompt_id,
                np.asarray(prompt_ids, np.int32),
                "digits",
                responses,
                sampling=SamplingParams(1.0, 1.0, max_tokens, n),
            )  # fmt: skip
        )
    return batch


def make_learner(model_dir, algo: str, groups, micro_batch: int):
    import torch

    from flowrl_async.learner.config import AlgoConfig
    from flowrl_async.learner.learner import Learner
    from flowrl_async.learner.log_z import LogZHead
    from flowrl_async.model import load_policy
    from flowrl_async.replay.client import SampleInfo

    infos = [SampleInfo(1, 0, 0.0)] * len(groups)
    torch.manual_seed(0)
    policy, ref = load_policy(model_dir), load_policy(model_dir)
    return Learner(
        policy, ref, LogZHead(policy.config.hidden_size), AlgoConfig(name=algo),
        lambda batch_size, version: (groups, infos), pad_token_id=0,
        batch_groups=len(groups), micro_batch=micro_batch, lr=1e-5,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--n", type=int, default=8, help="responses per group")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args(argv)
    one_thread()
    from flowrl_async.model import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="learner-bench-") as directory:
        model_dir = build_tiny_model(Path(directory) / "tiny", seed=0)
        groups = fixed_batch(model_dir, a.groups, a.n, a.max_tokens)
        learners = {algo: make_learner(model_dir, algo, groups, a.micro_batch) for algo in ALGOS}
    rows = len(groups) * a.n
    tokens = sum(len(r.token_ids) for g in groups for r in g.responses)
    prompt_len = max(len(g.prompt_token_ids) for g in groups)
    for learner in learners.values():
        for _ in range(a.warmup):
            learner.step()
    times = {algo: [] for algo in ALGOS}
    for r in range(a.repeats):
        order = ALGOS[r % len(ALGOS) :] + ALGOS[: r % len(ALGOS)]
        for algo in order:
            seconds, metrics = timed(learners[algo].step)
            assert metrics["tokens"] == tokens
            times[algo].append(seconds)
    m = {algo: median(t) for algo, t in times.items()}
    print(
        f"tiny Llama, {len(groups)} groups x {a.n} responses = {rows} sequences, prompts <= "
        f"{prompt_len} tokens, {tokens} response tokens (<= {a.max_tokens} each), micro-batch "
        f"{a.micro_batch}, one thread, median of {a.repeats} interleaved steps"
    )
    table_rows = [
        (algo, f"{1000 * s:.1f}", f"{tokens / s:,.0f}", f"{s / m['grpo']:.3f}x")
        for algo, s in m.items()
    ]
    print(table(("objective", "ms/step", "resp tok/s", "x grpo"), table_rows, (10, 8, 10, 7)))
    print(f"flowrl/grpo = {m['flowrl'] / m['grpo']:.3f}x (target <= 1.15x)")


if __name__ == "__main__":
    main()
