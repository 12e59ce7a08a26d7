"""algo.truncated (keep / drop / zero_reward), algo.log_z_detach and learner.log_z_grad_clip,
each checked on the learner's real step."""

import numpy as np
import pytest
import torch

from flowrl_async.learner.config import AlgoConfig
from flowrl_async.learner.learner import Learner
from flowrl_async.learner.log_z import LogZHead
from flowrl_async.model import build_tiny_model, load_policy
from flowrl_async.records import Group, Response
from flowrl_async.replay.client import SampleInfo


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "m", seed=1)


def batch(first_tokens=(5, 6, 7), first_reward=1.0, first_finish="length"):
    """One group of 4; response 0 hit the length limit (by default)."""
    rows = [(first_tokens, first_reward, first_finish), ((8, 9, 2), 0.0, "stop"),
            ((10, 2), 1.0, "stop"), ((11, 12, 2), 0.0, "stop")]  # fmt: skip
    responses = tuple(
        Response(np.array(t, np.int32), np.full(len(t), -2.0, np.float32), r, f, 0, 0)
        for t, r, f in rows
    )
    return [Group("g", 0, np.array([1, 20, 21], np.int32), "t", responses)], [SampleInfo(1, 0, 0.0)]


def learner(model_dir, data, **algo):
    torch.manual_seed(0)
    policy, ref = load_policy(model_dir), load_policy(model_dir)
    policy.model.layers[0].mlp.up_proj.weight.data.mul_(1.5)  # π ≠ π_ref
    extra = {k: algo.pop(k) for k in ("log_z_grad_clip", "grad_clip") if k in algo}
    return Learner(policy, ref, LogZHead(policy.config.hidden_size),
                   AlgoConfig(beta=1.0, **algo), lambda b, v: data, pad_token_id=0,
                   batch_groups=1, **extra)  # fmt: skip


def params(lrn):
    return [p.detach().clone() for p in lrn.trainable()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_drop_trains_nothing_on_a_truncated_response(model_dir):
    # the truncated response's tokens differ, its reward does not: with drop the two
    # updates are identical (bit for bit); kept, they differ
    a = learner(model_dir, batch((5, 6, 7)), truncated="drop")
    b = learner(model_dir, batch((30, 31, 32)), truncated="drop")
    out = a.step()
    b.step()
    assert same(params(a), params(b))
    assert out["no_eos_ratio"] == 0.25
    c = learner(model_dir, batch((5, 6, 7)), truncated="keep")
    d = learner(model_dir, batch((30, 31, 32)), truncated="keep")
    c.step()
    d.step()
    assert not same(params(c), params(d))


def test_zero_reward_trains_a_truncated_response_as_reward_0(model_dir):
    a = learner(model_dir, batch(first_reward=1.0), truncated="zero_reward")
    b = learner(model_dir, batch(first_reward=0.0), truncated="keep")
    a.step()
    b.step()
    assert same(params(a), params(b))


class Recorder(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head, self.inputs = head, []

    def forward(self, hidden, mask):
        self.inputs.append(hidden)
        return self.head(hidden, mask)


@pytest.mark.parametrize("detach", [False, True])
def test_log_z_detach_cuts_the_heads_gradient_into_the_trunk(model_dir, detach):
    lrn = learner(model_dir, batch(first_finish="stop"), log_z_detach=detach)
    lrn.log_z = Recorder(lrn.log_z)
    lrn.step()
    assert [h.requires_grad for h in lrn.log_z.inputs] == [not detach]
    assert all(p.grad is not None for p in lrn.log_z.head.parameters())  # the head learns


def test_the_log_z_head_can_be_clipped_by_its_own_norm(model_dir):
    def norm(ps):
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ps])))

    lrn = learner(model_dir, batch(first_finish="stop"), grad_clip=1e9, log_z_grad_clip=1e-6)
    lrn.step()  # the gradients stay on the parameters after the step, clipped
    assert norm(list(lrn.log_z.parameters())) == pytest.approx(1e-6, rel=1e-3)
    assert norm(list(lrn.policy.parameters())) > 1e-3  # the policy's: its own, unclipped
    one = learner(model_dir, batch(first_finish="stop"), grad_clip=1e-6)
    one.step()  # one norm over both
    assert norm(one.trainable()) == pytest.approx(1e-6, rel=1e-3)


def test_a_batch_with_every_response_dropped_updates_nothing(model_dir):
    group = batch(first_finish="length")[0][0]
    from dataclasses import replace

    cut = replace(
        group, responses=tuple(replace(r, finish_reason="length") for r in group.responses)
    )
    lrn = learner(model_dir, ([cut], [SampleInfo(1, 0, 0.0)]), truncated="drop")
    before = params(lrn)
    out = lrn.step()
    assert out["empty_steps"] == 1 and out["no_eos_ratio"] == 1.0 and lrn.version == 0
    assert same(before, params(lrn)) and not lrn.optimizer.state
