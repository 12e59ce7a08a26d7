"""The streaming rollout loop (actors/streaming.py) on the torch engine: groups leave as they
finish, weights load between engine steps with the running sequences' keys and values kept,
and the recorded log-probs are those the tokens were sampled with."""

import copy

import numpy as np
import pytest
import torch

from flowrl_async.actors.generator import SampleSpec
from flowrl_async.actors.streaming import StreamingLoop
from flowrl_async.actors.torch_generator import TorchGenerator
from flowrl_async.learner.batch import collate, forward
from flowrl_async.model import build_tiny_model, load_policy, load_tokenizer
from flowrl_async.tasks import PromptSource
from flowrl_async.tasks.sums import DigitPartsTask

from helpers import served_replay


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", seed=0)


@pytest.fixture
def replay(tmp_path):
    with served_replay(tmp_path / "replay", max_staleness=None, groups_per_version=64) as client:
        yield client


def make_loop(model_dir, replay, max_in_flight=3, max_tokens=12):
    tok = load_tokenizer(model_dir)
    gen = TorchGenerator(load_policy(model_dir), tok.eos_token_id, tok.pad_token_id, seed=1)
    loop = StreamingLoop(
        actor_id=1, generator=gen, prompts=PromptSource(DigitPartsTask(), seed=0), tokenizer=tok,
        replay=replay, spec=SampleSpec(n=3, temperature=1.0, top_p=1.0, max_tokens=max_tokens),
        max_in_flight=max_in_flight,
    )  # fmt: skip
    return loop, tok


def test_groups_leave_as_they_finish_and_slots_refill(model_dir, replay):
    loop, _ = make_loop(model_dir, replay)
    pushed_at = []
    for _ in range(40):
        before = loop.stats.groups
        loop.run_once()
        assert len(loop.pending) <= 3  # never more prompts in flight than slots
        pushed_at += [loop.engine_steps] * (loop.stats.groups - before)
    assert len(pushed_at) >= 4
    # groups finished at different engine steps: none waited for a batch's slowest member
    assert len(set(pushed_at)) >= 3
    got = replay.sample(len(pushed_at), version=0)
    assert sorted(g.cursor for g, _ in got) == sorted(set(g.cursor for g, _ in got))
    assert all(len(g.responses) == 3 for g, _ in got)  # whole groups only


def test_a_response_spanning_a_weight_load_records_what_each_token_was_sampled_with(
    model_dir, replay
):
    # keep mode: the tokens before the load keep the old weights' keys and values; every
    # token's recorded log-prob is log softmax of what the engine computed at that moment
    loop, tok = make_loop(model_dir, replay, max_in_flight=1, max_tokens=12)
    old = copy.deepcopy(loop.generator.model)
    loop.fill()
    key = next(iter(loop.pending))
    for _ in range(3):  # three tokens sampled under version 0 (the prompt, tokens 0, 1 fed)
        assert loop.generator.step() == []
    new_state = {k: v + 0.05 * torch.randn_like(v) for k, v in old.state_dict().items()}
    loop.generator.load_weights(new_state.items())
    loop.version = 1
    finished = []
    while not finished:
        finished = loop.generator.step()
    ((done_key, completions),) = finished
    assert done_key == key
    position, prompt, ids, started, version = loop.pending.pop(key)
    group = loop.build_group(position, prompt, ids, completions, started, version)
    assert all((r.first_version, r.last_version) == (0, 1) for r in group.responses)
    new = copy.deepcopy(old)
    new.load_state_dict(new_state)
    batch = collate([group], [0], tok.pad_token_id)
    with torch.no_grad():  # teacher forcing under either version alone
        alone = [forward(m, batch, 1.0, want_hidden=False).logprobs for m in (old, new)]
    assert any(len(r.token_ids) > 4 for r in group.responses)
    for i, r in enumerate(group.responses):
        seq = torch.tensor([list(ids) + r.token_ids.tolist()])
        p = len(ids)
        with torch.no_grad():  # the prompt and tokens 0, 1 fed under the old weights
            head = old(input_ids=seq[:, : p + 2], use_cache=True)
            tail = new(input_ids=seq[:, p + 2 :], past_key_values=head.past_key_values)
        logits = torch.cat([head.logits[0, p - 1 :], tail.logits[0, :-1]])
        want = torch.log_softmax(logits.float(), -1).gather(-1, seq[0, p:, None])[:, 0]
        np.testing.assert_allclose(r.behavior_logprobs, want.numpy(), atol=1e-5)
        n = len(r.token_ids)
        np.testing.assert_allclose(r.behavior_logprobs[:3], alone[0][i, :3].numpy(), atol=1e-5)
        if n > 4:  # after the load: neither version alone gives them
            for lp in alone:
                assert not np.allclose(r.behavior_logprobs[3:], lp[i, 3:n].numpy(), atol=1e-4)


def test_a_stopped_loop_pushes_nothing_half_generated(model_dir, replay):
    loop, _ = make_loop(model_dir, replay, max_in_flight=2, max_tokens=12)
    loop.fill()
    loop.generator.step()
    in_flight = [p[0] for p in loop.pending.values()]
    loop.stop_streaming()
    assert not loop.pending and loop.generator.in_flight() == 0
    assert replay.stats()["inserted"] == 0 and len(in_flight) == 2
    assert replay.stats()["in_flight"] == 2  # still outstanding: a release hands them out


def test_streaming_needs_the_engine_in_the_actors_process():
    from flowrl_async.config import TrainConfig, validate

    cfg = TrainConfig()
    cfg.generator.streaming, cfg.generator.engine_process = True, True
    with pytest.raises(ValueError, match="generator.streaming=true needs generator.engine_proc"):
        validate(cfg)
    cfg.generator.engine_process = False
    validate(cfg)


def test_streaming_is_refused_with_sync_mode_and_past_one_admission():
    from flowrl_async.config import TrainConfig, validate

    cfg = TrainConfig()
    cfg.generator.streaming, cfg.mode = True, "sync"  # before: stuck, then a sample timeout
    with pytest.raises(ValueError, match="needs mode=async"):
        validate(cfg)
    cfg.mode, cfg.generator.max_in_flight = "async", 5000
    with pytest.raises(ValueError, match=r"max_in_flight must be in \[1, 1024\]"):
        validate(cfg)


def test_after_a_refused_admission_the_loop_asks_again_only_when_a_slot_frees(model_dir):
    class Admission:
        def __init__(self):
            self.calls, self.granted = 0, False

        def admit(self, actor_id, k, weights=None):
            self.calls += 1
            if self.granted:
                return []  # the staleness bound says wait
            self.granted = True
            return list(range(2))

        def insert_many(self, groups, **_):
            return [True] * len(groups)

    replay = Admission()
    loop, _ = make_loop(model_dir, replay, max_in_flight=3, max_tokens=12)
    loop.idle_sleep_s = 60.0
    steps = 0
    while loop.pending or steps == 0:
        loop.run_once()
        steps += 1
    # before: one admit per engine step (a slot was free all along)
    assert steps > 4 and replay.calls <= 1 + 1 + 2  # first fill, the refusal, one per group
    assert loop.stats.groups == 2


def test_a_publication_is_in_use_from_the_next_engine_step(model_dir, replay):
    # the loop's own path: the receiver's publication is loaded and proved before the
    # next step, while the group in flight goes on under it
    from types import SimpleNamespace

    loop, _ = make_loop(model_dir, replay, max_in_flight=1, max_tokens=30)
    new_state = {k: v + 0.05 * torch.randn_like(v)
                 for k, v in loop.generator.model.state_dict().items()}  # fmt: skip

    class Receiver:
        def __init__(self):
            self.ready = None

        def take(self):
            got, self.ready = self.ready, None
            return got

    publication = SimpleNamespace(
        header=SimpleNamespace(version=5, probe_token_ids=()),
        load_into=lambda gen: gen.load_weights(new_state.items()),
    )
    loop.receiver = Receiver()
    loop.run_once()  # submits and steps under version 0
    assert loop.pending and loop.version == 0
    loop.receiver.ready = publication
    steps = loop.engine_steps
    loop.run_once()
    assert loop.version == 5 and loop.stats.weight_loads == 1  # loaded before that step
    assert loop.engine_steps == steps + 1
    assert torch.equal(loop.generator.model.state_dict()["lm_head.weight"],
                       new_state["lm_head.weight"])  # fmt: skip
    while loop.stats.groups == 0:
        loop.run_once()
    ((group, _),) = replay.sample(1, version=5)
    assert {(r.first_version, r.last_version) for r in group.responses} == {(0, 5)}
