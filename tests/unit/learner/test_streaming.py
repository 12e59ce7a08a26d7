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


class Ready:
    """A receiver holding at most one publication (WeightReceiver's take/waiting)."""

    def __init__(self):
        self.ready = None

    def waiting(self):
        return self.ready is not None

    def take(self):
        got, self.ready = self.ready, None
        return got


def publication(version, state):
    from types import SimpleNamespace

    return SimpleNamespace(header=SimpleNamespace(version=version, probe_token_ids=()),
                           load_into=lambda gen: gen.load_weights(state.items()))  # fmt: skip


def perturbed(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def stream_across_a_load(loop, steps_before=3):
    """One prompt in flight, ``steps_before`` engine steps under version 0, then version 1
    loaded through the loop's own path, then on to the end; -> (group, old, new models)."""
    old = copy.deepcopy(loop.generator.model)
    new_state = perturbed(old, 0)
    loop.receiver = Ready()
    loop.fill()
    for _ in range(steps_before):
        assert loop.generator.step() == []
        loop.engine_steps += 1
    loop.receiver.ready = publication(1, new_state)
    while loop.stats.groups == 0:
        loop.run_once()
    ((group, _),) = loop.replay.sample(1, version=1)
    new = copy.deepcopy(old)
    new.load_state_dict(new_state)
    return group, old, new


def keep_logprobs(old, new, ids, response):
    """Independently: the tokens before the switch sampled under ``old``; after it, ``new``
    over ``old``'s keys and values for the prompt and the tokens fed before the switch."""
    seq = torch.tensor([list(ids) + response.token_ids.tolist()])
    p, (k, _) = len(ids), response.switches
    with torch.no_grad():
        head = old(input_ids=seq[:, : p + k - 1], use_cache=True)
        tail = new(input_ids=seq[:, p + k - 1 :], past_key_values=head.past_key_values)
    logits = torch.cat([head.logits[0, p - 1 :], tail.logits[0, :-1]])
    return torch.log_softmax(logits.float(), -1).gather(-1, seq[0, p:, None])[:, 0].numpy()


def teacher_forced(model, ids, response):
    seq = torch.tensor([list(ids) + response.token_ids.tolist()])
    with torch.no_grad():
        logits = model(input_ids=seq).logits[0, len(ids) - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(-1, seq[0, len(ids) :, None])[:, 0].numpy()


def check_is_weights(group, new, tok):
    """The learner's IS weights from the recorded log-probs equal exp(Σ log π − Σ log μ)
    computed here token by token from the group's own arrays."""
    from flowrl_async.learner.objectives import sequence_importance_weights

    batch = collate([group], [0], tok.pad_token_id)
    with torch.no_grad():
        lp = forward(new, batch, 1.0, want_hidden=False).logprobs
    w = sequence_importance_weights(lp, batch.behavior_logprobs, batch.response_mask, "none")
    ids = group.prompt_token_ids.tolist()
    want = [np.exp(np.float64(teacher_forced(new, ids, r)).sum()
                   - np.float64(r.behavior_logprobs).sum()) for r in group.responses]  # fmt: skip
    np.testing.assert_allclose(w.double().numpy(), want, rtol=1e-4)


def test_a_response_spanning_a_load_keeps_its_cache_and_records_each_tokens_version(
    model_dir, replay
):
    # keep: the tokens after the load are sampled from the new weights over the old
    # weights' keys and values; each recorded log-prob is the one it was sampled with
    loop, tok = make_loop(model_dir, replay, max_in_flight=1, max_tokens=12)
    group, old, new = stream_across_a_load(loop, steps_before=3)
    ids = group.prompt_token_ids.tolist()
    assert any(len(r.token_ids) > 4 for r in group.responses)
    for r in group.responses:
        n = len(r.token_ids)
        # three tokens were sampled under version 0 (the prompt, tokens 0, 1 fed), then 1
        assert (r.first_version, r.last_version) == (0, 1 if n > 3 else 0)
        assert r.switches == ((3, 1) if n > 3 else ())
        assert r.token_versions().tolist() == [0] * min(n, 3) + [1] * (n - 3)
        np.testing.assert_allclose(r.behavior_logprobs, keep_logprobs(old, new, ids, r)
                                   if n > 3 else teacher_forced(old, ids, r), atol=1e-5)  # fmt: skip
        if n > 4:  # after the load: neither version alone gives them
            for model in (old, new):
                alone = teacher_forced(model, ids, r)
                assert not np.allclose(r.behavior_logprobs[3:], alone[3:], atol=1e-4)
    check_is_weights(group, new, tok)


def test_recompute_samples_every_token_after_a_load_from_the_new_version_alone(model_dir, replay):
    loop, tok = make_loop(model_dir, replay, max_in_flight=1, max_tokens=12)
    loop.inflight_kv = "recompute"
    group, old, new = stream_across_a_load(loop, steps_before=3)
    ids = group.prompt_token_ids.tolist()
    assert any(len(r.token_ids) > 4 for r in group.responses)
    for r in group.responses:
        versions = r.token_versions()
        # each token's log-prob is teacher forcing of its whole prefix under its version
        want = np.where(versions == 0, teacher_forced(old, ids, r), teacher_forced(new, ids, r))
        np.testing.assert_allclose(r.behavior_logprobs, want, atol=1e-5)
        assert versions.tolist() == [0] * min(len(versions), 3) + [1] * (len(versions) - 3)
    check_is_weights(group, new, tok)


def test_drain_mode_loads_only_once_the_engine_is_empty(model_dir, replay):
    loop, _ = make_loop(model_dir, replay, max_in_flight=2, max_tokens=12)
    loop.inflight_updates = False
    loop.receiver = Ready()
    loop.run_once()
    assert len(loop.pending) == 2
    loop.receiver.ready = publication(1, perturbed(loop.generator.model, 1))
    while loop.pending:  # admission stops; the engine drains under version 0
        loop.run_once()
        assert loop.version == 0 and len(loop.pending) <= 2
    loop.run_once()
    assert loop.version == 1 and loop.stats.weight_loads == 1 and loop.load_wait_max >= 1
    got = replay.sample(replay.stats()["size"], version=1)
    assert got and all(r.switches == () and r.first_version == r.last_version == 0
                       for g, _ in got for r in g.responses)  # fmt: skip


@pytest.mark.parametrize(
    "first, loads, length, want",
    [
        (0, [], 5, (0, (), 0)),
        (0, [(1, 3)], 5, (0, (3, 1), 1)),
        (0, [(1, 0)], 5, (0, (0, 1), 1)),  # before its first token: first (its prompt's) stays
        (0, [(1, 0), (2, 0), (4, 4)], 5, (0, (0, 2, 4, 4), 4)),
        (0, [(1, 2), (3, 2)], 5, (0, (2, 3), 3)),  # two loads between the same two tokens
        (0, [(1, 3), (2, 5), (3, 7)], 5, (0, (3, 1), 1)),  # after its end: no trace
        (2, [(3, 1), (4, None)], 5, (2, (), 4)),  # a count not known: an unrecorded split
        (2, [(2, 3), (3, 4), (3, 4)], 5, (2, (4, 3), 3)),  # the same version again: no switch
        (2, [(2, 0), (2, 1)], 5, (2, (), 2)),
        (0, [(v, v) for v in range(1, 300)], 400, (0, (), 299)),  # past MAX_SWITCHES: unrecorded
    ],
)
def test_token_switches_from_the_loads_while_in_flight(first, loads, length, want):
    from flowrl_async.actors.rollout import token_switches

    assert token_switches(first, loads, length) == want


def test_a_stopped_loop_pushes_nothing_half_generated(model_dir, replay):
    loop, _ = make_loop(model_dir, replay, max_in_flight=2, max_tokens=12)
    loop.fill()
    loop.generator.step()
    in_flight = [p.position for p in loop.pending.values()]
    loop.stop_streaming()
    assert not loop.pending and loop.generator.in_flight() == 0
    assert replay.stats()["inserted"] == 0 and len(in_flight) == 2
    assert replay.stats()["in_flight"] == 2  # still outstanding: a release hands them out


def test_streaming_is_the_default_and_sync_mode_runs_batch_by_batch(tmp_path):
    from flowrl_async.config import TrainConfig, validate
    from flowrl_async.run.processes import actor_args

    cfg = TrainConfig()
    assert cfg.generator.streaming and cfg.generator.inflight_updates
    assert cfg.generator.inflight_kv == "keep"
    _, kwargs = actor_args(cfg, 1, "m", "tcp://x:1")
    assert kwargs["max_in_flight"] == 8 and kwargs["inflight_kv"] == "keep"
    cfg.mode = "sync"  # lock-step counts whole batches: the actors batch (was refused)
    validate(cfg)
    assert actor_args(cfg, 1, "m", "tcp://x:1")[1]["max_in_flight"] is None
    cfg.mode, cfg.generator.streaming = "async", False  # batch mode: one setting away
    assert actor_args(cfg, 1, "m", "tcp://x:1")[1]["max_in_flight"] is None
    cfg.generator.streaming, cfg.generator.engine_process = True, True  # was refused
    validate(cfg)
    cfg.generator.max_in_flight = 5000
    with pytest.raises(ValueError, match=r"max_in_flight must be in \[1, 1024\]"):
        validate(cfg)
    cfg.generator.max_in_flight, cfg.generator.inflight_kv = 8, "drop"
    with pytest.raises(ValueError, match="inflight_kv='drop': expected one of keep, recompute"):
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
    # the loop's own path: the receiver's publication is loaded (and would be proved) before
    # the next step, while the group in flight goes on under it
    loop, _ = make_loop(model_dir, replay, max_in_flight=1, max_tokens=30)
    new_state = perturbed(loop.generator.model, 2)
    loop.receiver = Ready()
    loop.run_once()  # submits and steps under version 0
    assert loop.pending and loop.version == 0
    loop.receiver.ready = publication(5, new_state)
    steps = loop.engine_steps
    loop.run_once()
    assert loop.version == 5 and loop.stats.weight_loads == 1  # loaded before that step
    assert loop.engine_steps == steps + 1
    assert torch.equal(loop.generator.model.state_dict()["lm_head.weight"],
                       new_state["lm_head.weight"])  # fmt: skip
    while loop.stats.groups == 0:
        loop.run_once()
    ((group, _),) = replay.sample(1, version=5)
    # one token (the prefill's) under version 0, the rest under 5
    assert {(r.first_version, r.last_version, r.switches) for r in group.responses
            if len(r.token_ids) > 1} == {(0, 5, (1, 5))}  # fmt: skip


def test_drain_mode_ends_its_drain_when_the_publication_is_gone(model_dir, replay):
    # a receiver replaced (the group re-formed) or broken while draining: admission resumes
    # (before: the loop kept draining before every admission, as batch mode)
    loop, _ = make_loop(model_dir, replay, max_in_flight=2, max_tokens=12)
    loop.inflight_updates = False
    loop.receiver = Ready()
    loop.run_once()
    loop.receiver.ready = publication(1, perturbed(loop.generator.model, 3))
    loop.run_once()
    assert loop._waited is not None  # draining
    loop.receiver = Ready()  # re-formed: the new receiver holds nothing
    loop.run_once()
    assert loop._waited is None and len(loop.pending) == 2  # slots refilled at once


def test_the_engine_step_sums_count_running_sequences(model_dir, replay):
    loop, _ = make_loop(model_dir, replay, max_in_flight=2, max_tokens=6)
    while loop.stats.groups < 4:
        loop.run_once()
    n, k, kk, t, kt = loop.step_sums
    assert n == loop.engine_steps and t == pytest.approx(loop.engine_s)
    # every generated token was one running sequence in one step (finished rows that keep
    # stepping in the torch engine do not count), and at most 2 prompts x 3 responses run
    assert k == loop.generator.stepped_tokens >= loop.stats.tokens
    assert 1 <= k / n <= 6 and kk <= 36 * n
