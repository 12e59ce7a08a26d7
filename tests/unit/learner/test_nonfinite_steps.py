"""A step whose loss or gradient is not finite is skipped: weights and optimizer state stay
bit-identical, it is counted, and max_skipped_steps in a row stop training."""

import numpy as np
import pytest
import torch

from flowrl_async.learner.config import AlgoConfig
from flowrl_async.learner.learner import Learner, NonFiniteError
from flowrl_async.learner.log_z import LogZHead
from flowrl_async.model import build_tiny_model, load_policy
from flowrl_async.records import Group, Response
from flowrl_async.replay.client import SampleInfo


def group(reward_of_first: float) -> Group:
    responses = tuple(
        Response(np.array([5, 6, 2], np.int32), np.full(3, -2.0, np.float32),
                 reward_of_first if i == 0 else float(i % 2), "stop", 0, 0)
        for i in range(4)
    )  # fmt: skip
    return Group("g", 0, np.array([1, 20, 21], np.int32), "t", responses)


def test_a_nan_reward_skips_the_step_and_k_in_a_row_stop(tmp_path):
    path = build_tiny_model(tmp_path / "m")
    nan = float("nan")
    batches = iter([1.0, nan, 1.0, nan, nan])

    def sample(batch_size, version):
        return [group(next(batches))], [SampleInfo(1, 0, 0.0)]

    torch.manual_seed(0)
    policy = load_policy(path)
    learner = Learner(policy, load_policy(path), LogZHead(policy.config.hidden_size),
                      AlgoConfig(beta=1.0), sample, pad_token_id=0, batch_groups=1,
                      max_skipped_steps=2)  # fmt: skip
    learner.step()  # a finite step: AdamW has state now
    params = [p.detach().clone() for p in learner.trainable()]
    moments = [{k: v.clone() for k, v in s.items()} for s in learner.optimizer.state.values()]
    out = learner.step()  # the NaN reward makes the group-normalised rewards NaN
    assert out["skipped_steps"] == 1 and learner.version == 1  # nothing published
    assert all(torch.equal(a, b) for a, b in zip(params, learner.trainable(), strict=True))
    for before, after in zip(moments, learner.optimizer.state.values(), strict=True):
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in learner.trainable())
    out = learner.step()  # finite again: trains, publishes, the count in a row restarts
    assert out["skipped_steps"] == 1 and learner.version == 2 and learner.skipped_in_a_row == 0
    learner.step()  # skipped: 1 in a row
    with pytest.raises(NonFiniteError, match="2 steps in a row had a non-finite loss"):
        learner.step()
    assert learner.skipped_steps == 3


def test_a_group_sampled_at_another_temperature_is_refused_by_name(tmp_path):
    from dataclasses import replace

    from flowrl_async.learner.learner import SamplingMismatch
    from flowrl_async.records import SamplingParams

    path = build_tiny_model(tmp_path / "m")
    cold = replace(group(1.0), group_id="cold", sampling=SamplingParams(temperature=0.7))
    policy = load_policy(path)
    learner = Learner(policy, load_policy(path), LogZHead(policy.config.hidden_size),
                      AlgoConfig(beta=1.0), lambda b, v: ([cold], [SampleInfo(1, 0, 0.0)]),
                      pad_token_id=0, batch_groups=1)  # fmt: skip
    before = [p.detach().clone() for p in learner.trainable()]
    with pytest.raises(SamplingMismatch) as e:
        learner.step()
    assert "group cold was sampled at temperature 0.7" in str(e.value)
    assert "learner computes log-probs at temperature 1.0" in str(e.value)
    assert "algo.temperature=0.7" in str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(before, learner.trainable(), strict=True))
    learner.temperature = 0.7  # what algo.temperature=0.7 sets
    assert learner.step()["step"] == 1


def test_off_policy_tb_trains_at_temperature_1_on_groups_sampled_hotter(tmp_path):
    # trajectory balance with is_mode=off never reads the behaviour log-probs: a group the
    # actors sampled at 1.5 (exploration) is trained exactly as the same group sampled at 1.0
    from dataclasses import replace

    from flowrl_async.learner.learner import SamplingMismatch
    from flowrl_async.records import SamplingParams

    path = build_tiny_model(tmp_path / "m")
    tb = AlgoConfig(beta=3.0, reward_norm="raw", is_mode="off")

    def learner_on(g, algo=tb):
        policy = load_policy(path)
        return Learner(policy, load_policy(path), LogZHead(policy.config.hidden_size), algo,
                       lambda b, v: ([g], [SampleInfo(1, 0, 0.0)]), pad_token_id=0,
                       batch_groups=1)  # fmt: skip

    hot = replace(group(1.0), sampling=SamplingParams(temperature=1.5))
    torch.manual_seed(0)
    on_hot = learner_on(hot)
    torch.manual_seed(0)
    on_cold = learner_on(group(1.0))
    assert on_hot.temperature == 1.0
    assert on_hot.step()["loss"] == on_cold.step()["loss"]
    assert all(torch.equal(a, b) for a, b in
               zip(on_hot.trainable(), on_cold.trainable(), strict=True))  # fmt: skip
    # clipped IS weights read them: the same group is refused there, and so is top_p < 1
    with pytest.raises(SamplingMismatch, match="sampled at temperature 1.5"):
        learner_on(hot, AlgoConfig(beta=3.0, reward_norm="raw", is_mode="clip")).step()
    nucleus = replace(group(1.0), sampling=SamplingParams(temperature=1.5, top_p=0.9))
    with pytest.raises(SamplingMismatch, match="top_p 0.9"):
        learner_on(nucleus).step()
