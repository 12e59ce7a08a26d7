"""Checkpoint and resume: N steps, stop, resume, N more == 2N uninterrupted, exactly."""

import numpy as np
import torch

from flowrl_async.learner import checkpoint as ckpt
from flowrl_async.learner.checkpoint import checkpoints, latest
from flowrl_async.learner.config import AlgoConfig
from flowrl_async.learner.learner import Learner
from flowrl_async.learner.log_z import LogZHead
from flowrl_async.model import build_tiny_model, load_policy, load_tokenizer
from flowrl_async.records import Group, Response
from flowrl_async.replay.client import SampleInfo


def stream(step: int) -> list[Group]:
    """A fixed, deterministic stream of groups: the batch for a given step."""
    rng = np.random.default_rng(step)
    groups = []
    for k in range(2):
        responses = tuple(
            Response(
                token_ids=rng.integers(5, 15, size=3).astype(np.int32),
                behavior_logprobs=-rng.random(3).astype(np.float32) - 2.0,
                reward=float(rng.random()),
                finish_reason="length",
                first_version=0,
                last_version=0,
            )
            for _ in range(3)
        )
        groups.append(Group(f"s{step}g{k}", k, np.array([1, 20 + k, 21], np.int32), "t", responses))
    return groups


def make(model_dir):
    calls = {"n": 0}

    def sample(batch_size, version):
        calls["n"] += 1
        return stream(calls["n"]), [SampleInfo(1, 0, 0.0)] * 2

    torch.manual_seed(0)
    policy, ref = load_policy(model_dir), load_policy(model_dir)
    learner = Learner(
        policy,
        ref,
        LogZHead(policy.config.hidden_size),
        AlgoConfig(beta=2.0, is_mode="clip"),
        sample,
        pad_token_id=0,
        batch_groups=2,
        micro_batch=4,
        lr=1e-3,
        warmup_steps=3,
    )
    return learner, calls


def test_resume_reproduces_the_uninterrupted_loss_sequence(tmp_path):
    model_dir = build_tiny_model(tmp_path / "m", seed=0)
    tok = load_tokenizer(model_dir)
    n = 4
    straight, _ = make(model_dir)
    expected = [straight.step()["loss"] for _ in range(2 * n)]

    first, calls = make(model_dir)
    losses = [first.step()["loss"] for _ in range(n)]
    position = calls["n"]
    ckpt.save(tmp_path / "ckpt", first, tok, extra=lambda: {"stream_position": position})
    del first
    resumed, calls = make(model_dir)
    ckpt.load(latest(tmp_path / "ckpt"), resumed)
    extra = ckpt.read_extra(latest(tmp_path / "ckpt"))
    calls["n"] = extra["stream_position"]  # the data cursor comes back with the checkpoint
    losses += [resumed.step()["loss"] for _ in range(n)]
    assert resumed.step_count == 2 * n and resumed.version == 2 * n
    assert losses == expected  # exactly, not approximately


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    model_dir = build_tiny_model(tmp_path / "m", seed=0)
    learner, _ = make(model_dir)
    tok = load_tokenizer(model_dir)
    for step in (1, 2, 3, 4):
        learner.step_count = step
        ckpt.save(tmp_path / "c", learner, tok, keep=2)
    (tmp_path / "c" / ".step-00000005.partial").mkdir()  # a crash mid-write leaves this
    assert [p.name for p in checkpoints(tmp_path / "c")] == ["step-00000003", "step-00000004"]
    assert latest(tmp_path / "c").name == "step-00000004"
    # the saved policy loads with transformers' Auto classes
    reloaded = load_policy(latest(tmp_path / "c") / "policy")
    for (name, a), b in zip(
        learner.policy.state_dict().items(), reloaded.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_a_checkpoint_before_the_first_step_changes_nothing(tmp_path):
    # with no AdamW state yet, saving must not make any (get_state_dict would run a step of
    # learning rate 0: Adam's step count 1, so the first real update would be bias-corrected
    # as the second); resuming from it starts the optimizer fresh too
    model_dir = build_tiny_model(tmp_path / "m", seed=0)
    tok = load_tokenizer(model_dir)
    straight, _ = make(model_dir)
    expected = [straight.step()["loss"] for _ in range(2)]
    saved, _ = make(model_dir)
    ckpt.save(tmp_path / "c", saved, tok)
    assert not saved.optimizer.state
    assert [saved.step()["loss"] for _ in range(2)] == expected
    resumed, _ = make(model_dir)
    ckpt.load(latest(tmp_path / "c"), resumed)
    assert [resumed.step()["loss"] for _ in range(2)] == expected
    for a, b in zip(straight.policy.parameters(), resumed.policy.parameters(), strict=True):
        assert torch.equal(a, b)
