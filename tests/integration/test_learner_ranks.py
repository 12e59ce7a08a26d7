"""Learner ranks (FSDP2 over gloo, separate processes) make the same update as one learner:
one optimizer step on the same batch, with uneven token-budget micro-batches, gives the same
gradients and parameters, for flowrl, flowrl_tb and grpo."""

import multiprocessing as mp

import pytest
import torch

from flowrl_async.learner.config import AlgoConfig
from flowrl_async.net import free_port

ALGOS = {
    "flowrl": AlgoConfig(beta=1.0, is_mode="clip"),
    "flowrl_tb": AlgoConfig(beta=3.0, reward_norm="raw", is_mode="off"),
    "grpo": AlgoConfig(name="grpo", kl_coef=0.05),
}


def batch(model_dir):
    """5 groups of 2-4 responses of 1-6 tokens: rank 0 gets 3 groups, rank 1 gets 2, and
    the token budget splits them into different numbers of micro-batches per rank."""
    import numpy as np

    from flowrl_async.records import Group, Response
    from flowrl_async.replay.client import SampleInfo

    g = np.random.default_rng(0)
    groups = []
    for k in range(5):
        n = 2 + k % 3
        responses = tuple(
            Response(g.integers(3, 60, 1 + (k + j) % 6).astype(np.int32),
                     g.uniform(-3, -0.5, 1 + (k + j) % 6).astype(np.float32),
                     float(j % 2), "stop", 0, 0, "ok" if j % 2 else "x")
            for j in range(n)
        )  # fmt: skip
        prompt = g.integers(3, 60, 2 + k).astype(np.int32)
        groups.append(Group(f"g{k}", k, prompt, "digits", responses))
    return groups, [SampleInfo(1, k % 3, 0.0) for k in range(5)]


def make(model_dir, algo_name, rank=0, world=1, port=0, dtype=None):
    """A learner (rank ``rank`` of ``world``) on the fixed batch."""
    torch.set_num_threads(1)
    from flowrl_async.learner.learner import Learner
    from flowrl_async.learner.log_z import LogZHead
    from flowrl_async.learner.sharding import Ranks
    from flowrl_async.model import load_policy

    ranks = Ranks.join("127.0.0.1", port, rank, world) if world > 1 else None
    torch.manual_seed(0)
    policy, ref = load_policy(model_dir), load_policy(model_dir)
    policy.model.layers[0].mlp.up_proj.weight.data.mul_(1.5)  # π ≠ π_ref: the KL and TB terms move
    head = LogZHead(policy.config.hidden_size)
    groups, infos = batch(model_dir)
    learner = Learner(policy, ref, head, ALGOS[algo_name], lambda b, v: (groups, infos),
                      pad_token_id=0, batch_groups=5, micro_batch=4, max_tokens_per_micro=24,
                      logprob_chunk=5, lr=1e-4, log_z_lr=1e-3, ranks=ranks,
                      param_dtype=dtype)  # fmt: skip
    return learner, head


def snapshot(learner, head, metrics) -> dict:
    from flowrl_async.learner.sharding import full_tensor

    params = {n: full_tensor(p.detach()).clone() for n, p in learner.policy.named_parameters()}
    if any(p.grad is None for p in learner.policy.parameters()):
        return {"params": params}
    grads = {n: full_tensor(p.grad).clone() for n, p in learner.policy.named_parameters()}
    params.update({f"log_z.{n}": p.detach().clone() for n, p in head.named_parameters()})
    return {"params": params, "grads": grads, "loss": metrics["loss"],
            "grad_norm": metrics["grad_norm"]}  # fmt: skip


def one_step(model_dir, algo_name, rank=0, world=1, port=0, dtype=None):
    """Build a learner, take one step; -> full params, grads, loss, grad norm."""
    learner, head = make(model_dir, algo_name, rank, world, port, dtype)
    return snapshot(learner, head, learner.step())


def resume_then_step(model_dir, algo_name, state_file, rank=0, world=1, port=0):
    """Load a checkpoint written by any number of ranks, then take one step."""
    learner, head = make(model_dir, algo_name, rank, world, port)
    state, policy_state = torch.load(state_file, weights_only=False)
    learner.load_training_state(state, policy_state)
    return snapshot(learner, head, learner.step())


def step_save_step(model_dir, algo_name, state_file, rank=0, world=1, port=0):
    """One step, a checkpoint's contents to ``state_file``, one more step."""
    from flowrl_async.model import cpu_state

    learner, head = make(model_dir, algo_name, rank, world, port)
    learner.step()
    state, policy_state = learner.training_state(), cpu_state(learner.policy)  # collectives
    if rank == 0:
        torch.save((state, policy_state), state_file)
    return snapshot(learner, head, learner.step())


def rank_main(fn, args, rank, world, port, queue, kwargs=None):
    import torch.distributed as dist

    out = fn(*args, rank, world, port, **(kwargs or {}))
    dist.barrier()
    dist.destroy_process_group()  # before exit: the group's threads stop first
    if rank == 0:
        queue.put({k: ({n: t.numpy() for n, t in v.items()} if isinstance(v, dict) else v)
                   for k, v in out.items()})  # fmt: skip


def on_two_ranks(fn, args, **kwargs) -> dict:
    """``fn(*args, rank, 2, port, **kwargs)`` in two spawned processes; -> rank 0's result."""
    ctx, port = mp.get_context("spawn"), free_port()
    queue = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(fn, args, r, 2, port, queue, kwargs))
             for r in range(2)]  # fmt: skip
    for p in procs:
        p.start()
    out = None
    for _ in range(240):  # a rank that dies fails the test at once, not at the timeout
        try:
            out = queue.get(timeout=1)
            break
        except Exception:
            assert all(p.exitcode in (None, 0) for p in procs), [p.exitcode for p in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return out


def relative(a: dict, b: dict) -> float:
    num = sum(float(((torch.as_tensor(a[k]) - torch.as_tensor(b[k])) ** 2).sum()) for k in a)
    den = sum(float((torch.as_tensor(a[k]) ** 2).sum()) for k in a)
    return (num / den) ** 0.5


@pytest.mark.integration
@pytest.mark.parametrize("algo_name", list(ALGOS))
def test_two_learner_ranks_make_the_one_rank_update(tmp_path, algo_name):
    from flowrl_async.model import build_tiny_model

    model_dir = str(build_tiny_model(tmp_path / "m", seed=2))
    single = one_step(model_dir, algo_name)
    two = on_two_ranks(one_step, (model_dir, algo_name))
    assert set(two["params"]) == set(single["params"])
    print(
        algo_name,
        "grads",
        relative(single["grads"], two["grads"]),
        "params",
        relative(single["params"], two["params"]),
    )
    assert two["loss"] == pytest.approx(single["loss"], rel=1e-6, abs=1e-7)
    assert two["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-6)
    assert relative(single["grads"], two["grads"]) < 1e-6
    assert relative(single["params"], two["params"]) < 1e-6


@pytest.mark.integration
def test_a_checkpoint_resumes_on_another_number_of_ranks(tmp_path):
    # 2 ranks: step, checkpoint, step == 1 rank: load that checkpoint, step (2 -> 1); and
    # 1 rank: step, checkpoint, step == 2 ranks: load it, step (1 -> 2)
    from flowrl_async.model import build_tiny_model

    model_dir = str(build_tiny_model(tmp_path / "m", seed=2))
    two = on_two_ranks(step_save_step, (model_dir, "flowrl", str(tmp_path / "two.pt")))
    one_after = resume_then_step(model_dir, "flowrl", str(tmp_path / "two.pt"))
    print("2 -> 1", relative(two["params"], one_after["params"]))
    assert relative(two["params"], one_after["params"]) < 1e-6

    one = step_save_step(model_dir, "flowrl", str(tmp_path / "one.pt"))
    two_after = on_two_ranks(resume_then_step, (model_dir, "flowrl", str(tmp_path / "one.pt")))
    print("1 -> 2", relative(one["params"], two_after["params"]))
    assert relative(one["params"], two_after["params"]) < 1e-6
    state, _ = torch.load(tmp_path / "two.pt", weights_only=False)
    assert state["step"] == 1 and not any(
        hasattr(v, "device_mesh") for e in state["optimizer"]["state"].values() for v in e.values()
    )  # plain tensors on disk: one format for every number of ranks


@pytest.mark.integration
def test_bf16_compute_keeps_fp32_master_weights_and_the_same_update(tmp_path):
    # bf16 compute (autocast on one rank, FSDP2 mixed precision on two): the gradient is
    # the fp32 one within bf16's rounding, the master weights stay float32
    from flowrl_async.model import build_tiny_model

    model_dir = str(build_tiny_model(tmp_path / "m", seed=2))
    fp32 = one_step(model_dir, "flowrl")
    one = one_step(model_dir, "flowrl", dtype=torch.bfloat16)
    two = on_two_ranks(one_step, (model_dir, "flowrl"), dtype=torch.bfloat16)
    print("bf16 grads vs fp32: 1 rank", relative(fp32["grads"], one["grads"]),
          "2 ranks", relative(fp32["grads"], two["grads"]))  # fmt: skip
    assert all(v.dtype == torch.float32 for v in one["params"].values())
    assert all(str(v.dtype) == "float32" for v in two["params"].values())
    assert 0 < relative(fp32["grads"], one["grads"]) < 5e-2
    assert 0 < relative(fp32["grads"], two["grads"]) < 5e-2
