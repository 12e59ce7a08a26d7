"""The actor loop and the learner step on the tiny model, wired through a real replay server."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flowrl_async.actors.generator import SampleSpec
from flowrl_async.actors.rollout import RolloutLoop
from flowrl_async.actors.torch_generator import TorchGenerator
from flowrl_async.learner.batch import collate, forward
from flowrl_async.learner.config import AlgoConfig
from flowrl_async.learner.learner import Learner
from flowrl_async.learner.log_z import LogZHead
from flowrl_async.model import build_tiny_model, load_policy, load_tokenizer
from flowrl_async.tasks import PromptSource
from flowrl_async.tasks.digits import DigitSumTask

from factories import make_group
from helpers import served_replay


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", seed=0)


@pytest.fixture
def replay(tmp_path):
    with served_replay(tmp_path / "replay", max_staleness=None, groups_per_version=4) as client:
        yield client


def test_rollout_loop_pushes_verified_groups_with_behaviour_logprobs(model_dir, replay):
    tok = load_tokenizer(model_dir)
    model = load_policy(model_dir)
    task = DigitSumTask()
    loop = RolloutLoop(
        actor_id=3, generator=TorchGenerator(model, tok.eos_token_id, tok.pad_token_id),
        prompts=PromptSource(task, seed=0), tokenizer=tok, replay=replay,
        spec=SampleSpec(n=4, temperature=0.9, top_p=1.0, max_tokens=5), groups_per_batch=2,
        version=0,
    )  # fmt: skip
    loop.run(max_batches=2)
    got = replay.sample(4, version=0)
    assert [g.cursor for g, _ in got] == [0, 1, 2, 3]  # work came from admission, in order
    source = PromptSource(task, seed=0)
    for group, _ in got:
        prompt = source.at(group.cursor)
        assert group.prompt_id == prompt.prompt_id and group.actor_id == 3
        assert len(group.responses) == 4 and group.sampling.temperature == 0.9
        batch = collate([group], [0], tok.pad_token_id)
        with torch.no_grad():
            lp = forward(model, batch, 0.9, want_hidden=False).logprobs
        for i, r in enumerate(group.responses):
            text = tok.decode(r.token_ids, skip_special_tokens=True)
            assert r.reward == task.verify(prompt, text).reward
            assert (r.first_version, r.last_version) == (0, 0)
            # the recorded behaviour log-probs are the policy's at the sampling temperature
            n = len(r.token_ids)
            np.testing.assert_allclose(r.behavior_logprobs, lp[i, :n].numpy(), atol=1e-5)
    assert loop.stats.groups == 4


def make_learner(model_dir, sample_fn, micro_batch, algo=None, seed=0, lr=1e-3, log_z_lr=1e-3):
    torch.manual_seed(seed)
    policy, ref = load_policy(model_dir), load_policy(model_dir)
    head = LogZHead(policy.config.hidden_size)
    return Learner(
        policy,
        ref,
        head,
        algo or AlgoConfig(beta=1.0, is_mode="none"),
        sample_fn,
        pad_token_id=0,
        batch_groups=3,
        micro_batch=micro_batch,
        lr=lr,
        log_z_lr=log_z_lr,
    )


def fixed_groups(model_dir):
    tok = load_tokenizer(model_dir)
    gen = TorchGenerator(load_policy(model_dir), tok.eos_token_id, tok.pad_token_id, seed=1)
    task = DigitSumTask(partial_credit=0.5)
    from flowrl_async.records import Group, Response

    groups = []
    for k, prompt in enumerate(task.train_prompts[:3]):
        ids = tok(prompt.text)["input_ids"]
        comps = gen.generate([ids], SampleSpec(4, 1.0, 1.0, 5))[0]
        responses = tuple(
            Response(c.token_ids, c.logprobs, float(j), c.finish_reason, 0, 0, "x")
            for j, c in enumerate(comps)
        )
        groups.append(
            Group(f"g{k}", prompt.prompt_id, np.asarray(ids, np.int32), "digits", responses)
        )
    return groups


def test_learner_lowers_flowrl_loss_on_a_fixed_batch(model_dir):
    groups = fixed_groups(model_dir)
    from flowrl_async.replay.client import SampleInfo

    learner = make_learner(
        model_dir, lambda b, v: (groups, [SampleInfo(1, 0, 0.0)] * 3), 64,
        algo=AlgoConfig(beta=1.0, is_mode="clip"), lr=1e-4,
    )  # fmt: skip
    losses = [learner.step()["loss"] for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert learner.version == 20  # publish_every=1: one version per step


def test_log_z_moves_to_its_fixed_point(model_dir):
    # With the policy frozen (lr 0), δ_i = log Z(x) + c_i with c_i = mean_t log π − β·r̂_i −
    # mean_t log π_ref; the loss Σ_i δ_i² is minimised at log Z(x) = −mean_i c_i per prompt.
    # Here π = π_ref, so c_i = −β·r̂_i and the fixed point is −β·mean(r̂) = 0 per prompt.
    groups = fixed_groups(model_dir)
    from flowrl_async.replay.client import SampleInfo

    learner = make_learner(
        model_dir, lambda b, v: (groups, [SampleInfo(1, 0, 0.0)] * 3), 64,
        algo=AlgoConfig(beta=2.0, is_mode="none"), lr=0.0, log_z_lr=1e-2,
    )  # fmt: skip
    torch.nn.init.constant_(learner.log_z.out.bias, 3.0)  # start away from the fixed point
    log_z = [learner.step()["log_z"] for _ in range(60)]
    assert abs(log_z[0]) > 2.5 and abs(log_z[-1]) < 0.05, log_z


def test_micro_batching_gives_the_same_gradient(model_dir):
    # 12 sequences in one pass vs micro-batches of 5, 5, 2: the same loss and gradients,
    # because every micro-batch divides by the step's 12 sequences, not its own size
    groups = fixed_groups(model_dir)
    from flowrl_async.replay.client import SampleInfo

    grads = []
    for micro in (64, 5):
        learner = make_learner(model_dir, lambda b, v: (groups, [SampleInfo(1, 0, 0.0)] * 3), micro)
        learner.optimizer.step = lambda: None  # keep the weights: compare gradients only
        m = learner.step()
        grads.append((m["loss"], [p.grad.clone() for p in learner.trainable()]))
    (loss_a, ga), (loss_b, gb) = grads
    assert abs(loss_a - loss_b) < 1e-5
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_staleness_histogram_counts_rows_from_weights_ahead_apart():
    """After a resume, groups made by the lost run's weights are numbered after the
    learner's version: they go to ``staleness_ahead``, never to a ``staleness_-1`` key."""

    class Batch(SimpleNamespace):
        def __len__(self):
            return 4

    batch = Batch(
        rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]),
        correct=torch.tensor([True, False, False, True]),
        staleness=torch.tensor([-1, 0, 0, 2]),
        response_mask=torch.ones(4, 3, dtype=torch.bool),
    )
    groups = [make_group("g", n=4)]
    m = Learner.batch_metrics(None, batch, groups)
    stale = {k: v for k, v in m.items() if k.startswith("staleness_")}
    assert stale == {
        "staleness_mean": 0.25,
        "staleness_max": 2.0,
        "staleness_0": 0.5,
        "staleness_2": 0.25,
        "staleness_ahead": 0.25,
    }


def test_token_budget_micro_batches_pack_longest_first(model_dir):
    # 12 rows of varied prompt + response lengths, a budget of 3 longest rows: every
    # micro-batch holds its rows padded to its longest prompt and response within budget
    from flowrl_async.learner.batch import collate, micro_batches

    groups = fixed_groups(model_dir)

    batch = collate(groups, [0, 0, 0], pad_token_id=0)
    prompt = batch.attention_mask[:, : batch.prompt_width].sum(1)
    lengths = (prompt + batch.response_mask.sum(1)).tolist()
    budget = 3 * max(lengths)
    micros = micro_batches(batch, max_rows=5, max_tokens=budget)
    assert sorted(i for m in micros for i in m) == list(range(len(batch)))  # each row once
    for m in micros:
        p = max(int(prompt[i]) for i in m)
        t = max(int(batch.response_mask[i].sum()) for i in m)
        assert len(m) <= 5 and (len(m) == 1 or len(m) * (p + t) <= budget)
    order = [i for m in micros for i in m]
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)  # longest first
    # a budget below any row: every row alone
    assert micro_batches(batch, 5, max_tokens=1) == [[i] for i in order]
    # no budget: consecutive runs of max_rows
    assert micro_batches(batch, 5) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    # select trims the padding no selected row needs
    for i in (order[0], order[-1]):
        one = batch.select([i])
        t = max(1, int(batch.response_mask[i].sum()))
        assert one.input_ids.shape[1] == int(prompt[i]) + t and one.prompt_width == int(prompt[i])
        assert one.attention_mask.sum() == lengths[i]


def test_token_budget_micro_batching_gives_the_same_gradient(model_dir):
    # one pass over the 12 sequences vs uneven token-budget micro-batches (rows resorted,
    # padding trimmed per micro-batch): the same loss and gradients, for each objective
    from flowrl_async.replay.client import SampleInfo

    groups = fixed_groups(model_dir)
    for algo in (AlgoConfig(beta=1.0, is_mode="none"), AlgoConfig(name="grpo"),
                 AlgoConfig(beta=3.0, reward_norm="raw", is_mode="off")):  # fmt: skip
        grads = []
        for budget in (None, 16):
            learner = make_learner(model_dir, lambda b, v: (groups, [SampleInfo(1, 0, 0.0)] * 3),
                                   64, algo=algo)  # fmt: skip
            learner.max_tokens_per_micro, learner.logprob_chunk = budget, 3
            learner.optimizer.step = lambda: None  # keep the weights: compare gradients only
            learner.grad_clip = 1e9
            m = learner.step()
            grads.append((m["loss"], [p.grad.clone() for p in learner.trainable()]))
        (loss_a, ga), (loss_b, gb) = grads
        assert loss_b == pytest.approx(loss_a, rel=1e-6, abs=1e-7)  # GRPO starts at ~0
        a, b = torch.cat([g.flatten() for g in ga]), torch.cat([g.flatten() for g in gb])
        assert ((a - b).norm() / a.norm()).item() < 1e-6  # the whole gradient, relative
