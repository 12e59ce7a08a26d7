"""Generation throughput of the three engines, and the rollout actor's overhead over generating.

On the built-in tiny model (built into a temporary directory), one process, one thread:

  engines   tokens/s of VLLMGenerator.generate, TorchGenerator.generate and transformers
            ``model.generate`` (with the sampled tokens' log-probs, which every actor needs)
            on the same batch: P digit-task prompts × n responses × max_tokens tokens,
            temperature 1, top-p 1. EOS is ignored everywhere, so every engine produces
            exactly P·n·max_tokens tokens (counted and checked): vLLM through
            ``SamplingParams(ignore_eos=True)`` (patched in for the benchmark, since
            SampleSpec has no such field), TorchGenerator with an EOS id no token has,
            transformers with ``min_new_tokens = max_tokens``. Each engine is warmed up
            (vLLM's first call compiles kernels), then the repeats are interleaved
            (vLLM, torch, transformers, vLLM, ...) and the median is reported.
  actor     RolloutLoop.run_once (admission, tokenising, generating with VLLMGenerator,
            verifying, building groups, one acknowledged insert per group into a real
            replay server with its log on disk, served from a thread of this process) vs
            bare VLLMGenerator.generate on the same prompts, interleaved; overhead =
            median(run_once) / median(bare) − 1 (target <= 5%). The time run_once spends
            outside generate is also measured inside the same call and printed with its
            parts (verify = decode + verifier; push = inserts; the rest = admission,
            tokenising, the weight check). The server shares this process's GIL, so its
            work counts as overhead here; in a real run it is another process.

Run: .venv/bin/python benchmarks/generation.py [--prompts 64] [--n 4] [--max-tokens 32]
     [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path

from _common import median, one_thread, table, timed

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # before configure_vllm_env's default
warnings.filterwarnings("ignore")


@contextlib.contextmanager
def eos_ignored():
    """Every vLLM request made inside generates max_tokens tokens (VLLMGenerator builds its
    SamplingParams from ``vllm.SamplingParams`` at call time)."""
    import vllm

    original = vllm.SamplingParams
    vllm.SamplingParams = functools.partial(original, ignore_eos=True)
    try:
        yield
    finally:
        vllm.SamplingParams = original


def count_tokens(groups) -> int:
    return sum(len(c.token_ids) for group in groups for c in group)


class Recording:
    """A Generator that passes calls through and keeps the last prompts and generate time."""

    def __init__(self, inner):
        self.inner, self.prompts, self.seconds = inner, None, 0.0

    def generate(self, prompts, spec):
        self.prompts = [list(p) for p in prompts]
        self.seconds, out = timed(lambda: self.inner.generate(prompts, spec))
        return out

    def load_weights(self, named_tensors):
        self.inner.load_weights(named_tensors)

    def probe_logprob(self, token_ids):
        return self.inner.probe_logprob(token_ids)


def hf_generate(model, tokenizer, texts: list[str], n: int, max_tokens: int):
    """transformers sampling with the sampled tokens' log-probs -> (sequences, logprobs)."""
    import torch

    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            num_return_sequences=n,
            return_dict_in_generate=True,
            output_scores=True,
            pad_token_id=tokenizer.pad_token_id,
        )
        logprobs = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    return out.sequences[:, enc["input_ids"].shape[1] :], logprobs


def engine_figures(vllm_gen, torch_gen, hf_model, tokenizer, texts, token_ids, spec, repeats):
    expected = len(texts) * spec.n * spec.max_tokens
    runs = {
        "VLLMGenerator.generate": lambda: count_tokens(vllm_gen.generate(token_ids, spec)),
        "TorchGenerator.generate": lambda: count_tokens(torch_gen.generate(token_ids, spec)),
        "transformers generate + log-probs": lambda: int(
            hf_generate(hf_model, tokenizer, texts, spec.n, spec.max_tokens)[1].numel()
        ),
    }
    times = {name: [] for name in runs}
    for run in runs.values():  # warm-up (vLLM compiles its kernels on a fresh machine)
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            seconds, tokens = timed(run)
            assert tokens == expected, (name, tokens, expected)
            times[name].append(seconds)
    return {name: median(t) for name, t in times.items()}, expected


def actor_figures(vllm_gen, task, tokenizer, spec, prompts_per_batch, repeats, directory):
    from flowrl_async.actors.rollout import RolloutLoop
    from flowrl_async.replay.client import ReplayClient
    from flowrl_async.replay.server import ReplayServer, ServerConfig
    from flowrl_async.tasks import PromptSource

    server = ReplayServer(
        ServerConfig(
            str(Path(directory) / "replay"),
            "tcp://127.0.0.1:0",
            capacity=1_000_000,
            max_staleness=None,
            groups_per_version=prompts_per_batch,
        )
    )
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    while server.bound_address is None:
        time.sleep(0.01)
    client = ReplayClient(server.bound_address)
    recorder = Recording(vllm_gen)
    loop = RolloutLoop(
        actor_id=0, generator=recorder, prompts=PromptSource(task, seed=0), tokenizer=tokenizer,
        replay=client, spec=spec, groups_per_batch=prompts_per_batch,
    )  # fmt: skip
    loops, bares, inside, parts = [], [], [], {"verify": [], "push": [], "rest": []}
    try:
        loop.run_once()  # warm-up: sockets, the log's first segment
        vllm_gen.generate(recorder.prompts, spec)
        for _ in range(repeats):
            verify0, push0 = loop.stats.verify_s, loop.stats.push_s
            seconds, generated = timed(loop.run_once)
            assert generated == 1, "admission refused a batch"
            bare, groups = timed(lambda: vllm_gen.generate(recorder.prompts, spec))
            assert count_tokens(groups) == len(recorder.prompts) * spec.n * spec.max_tokens
            loops.append(seconds)
            bares.append(bare)
            outside = seconds - recorder.seconds
            inside.append(outside)
            verify, push = loop.stats.verify_s - verify0, loop.stats.push_s - push0
            parts["verify"].append(verify)
            parts["push"].append(push)
            parts["rest"].append(outside - verify - push)
        stats = client.stats()
    finally:
        client.close()
        server.stop()
        thread.join(5)
    assert stats["inserted"] == (repeats + 1) * prompts_per_batch, stats
    return {
        "run_once": median(loops),
        "bare": median(bares),
        "outside": median(inside),
        **{k: median(v) for k, v in parts.items()},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=4, help="responses per prompt")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    one_thread()  # before vLLM's engine is built: it keeps the thread count it finds

    from flowrl_async.actors.generator import SampleSpec
    from flowrl_async.actors.torch_generator import TorchGenerator
    from flowrl_async.actors.vllm_generator import VLLMGenerator
    from flowrl_async.model import build_tiny_model, load_policy, load_tokenizer
    from flowrl_async.tasks import PromptSource
    from flowrl_async.tasks.digits import DigitSumTask

    with tempfile.TemporaryDirectory(prefix="gen-bench-") as directory:
        model_dir = build_tiny_model(Path(directory) / "tiny", seed=0)
        tokenizer = load_tokenizer(model_dir)
        task = DigitSumTask()
        source = PromptSource(task, seed=0)
        texts = [source.at(i).text for i in range(a.prompts)]
        token_ids = [tokenizer(t)["input_ids"] for t in texts]
        spec = SampleSpec(n=a.n, temperature=1.0, top_p=1.0, max_tokens=a.max_tokens)
        vllm_gen = VLLMGenerator(str(model_dir), max_model_len=256)
        no_eos = -1  # an id no token has: TorchGenerator never stops early
        torch_gen = TorchGenerator(load_policy(model_dir), no_eos, tokenizer.pad_token_id)
        hf_model = load_policy(model_dir)
        with eos_ignored():
            engines, tokens = engine_figures(
                vllm_gen, torch_gen, hf_model, tokenizer, texts, token_ids, spec, a.repeats
            )
            actor = actor_figures(vllm_gen, task, tokenizer, spec, a.prompts, a.repeats, directory)

    print(
        f"tiny Llama, {a.prompts} digit-task prompts x n={a.n}, {a.max_tokens} tokens each "
        f"(EOS ignored: {tokens} tokens per call), temperature 1, one thread, "
        f"median of {a.repeats}"
    )
    base = engines["VLLMGenerator.generate"]
    rows = [
        (name, f"{s:.3f}", f"{tokens / s:,.0f}", f"{base / s:.2f}") for name, s in engines.items()
    ]
    print(table(("engine", "s/call", "tokens/s", "x vLLM"), rows, (34, 8, 10, 7)))
    print()
    overhead = actor["run_once"] / actor["bare"] - 1.0
    rows = [
        ("RolloutLoop.run_once", f"{actor['run_once']:.3f}", f"{tokens / actor['run_once']:,.0f}"),
        ("bare VLLMGenerator.generate", f"{actor['bare']:.3f}", f"{tokens / actor['bare']:,.0f}"),
    ]
    print(table(("actor, same batch", "s/call", "tokens/s"), rows, (34, 8, 10)))
    print(f"actor overhead: run_once / bare generate - 1 = {100 * overhead:+.1f}% (target <= 5%)")
    print(
        f"time outside generate within run_once: {1000 * actor['outside']:.1f} ms = "
        f"{100 * actor['outside'] / actor['bare']:.1f}% of bare generate "
        f"(verify {1000 * actor['verify']:.1f} ms, push {1000 * actor['push']:.1f} ms, "
        f"admission + tokenising + rest {1000 * actor['rest']:.1f} ms)"
    )


if __name__ == "__main__":
    main()
