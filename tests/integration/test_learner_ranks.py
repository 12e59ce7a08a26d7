"""Learner ranks (FSDP2 over gloo, separate processes) make the same update as one learner:
one optimizer step on the same batch, with uneven token-budget micro-batches, gives the same
gradients and parameters, for flowrl, flowrl_tb and grpo."""

import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from flowrl_async.learner.config import AlgoConfig
from flowrl_async.model import build_tiny_model
from flowrl_async.net import free_port

PROBE = (1, 20, 21, 22, 30, 31)
ALGOS = {
    "flowrl": AlgoConfig(beta=1.0, is_mode="clip"),
    "flowrl_tb": AlgoConfig(beta=3.0, reward_norm="raw", is_mode="off"),
    "grpo": AlgoConfig(name="grpo", kl_coef=0.05),
    # the step's loss divided by its response tokens, not its rows
    "grpo_token_mean": AlgoConfig(name="grpo", loss_agg="token-mean"),
    # groups 3 and 4 (rank 1's share) hit the length limit: rank 1 trains on nothing
    "flowrl_drop": AlgoConfig(beta=1.0, is_mode="clip", truncated="drop"),
    "vargrad": AlgoConfig(
        name="vargrad", beta=1.0, reward_norm="raw", residual="sum_over_len", is_mode="off"
    ),
}


def batch(model_dir, truncate=False):
    """5 groups of 2-4 responses of 1-6 tokens: rank 0 gets 3 groups, rank 1 gets 2, and
    the token budget splits them into different numbers of micro-batches per rank."""
    from flowrl_async.records import Group, Response
    from flowrl_async.replay.client import SampleInfo

    g = np.random.default_rng(0)
    groups = []
    for k in range(5):
        n = 2 + k % 3
        responses = tuple(
            Response(g.integers(3, 60, 1 + (k + j) % 6).astype(np.int32),
                     g.uniform(-3, -0.5, 1 + (k + j) % 6).astype(np.float32),
                     float(j % 2), "length" if truncate and k >= 3 else "stop", 0, 0,
                     "ok" if j % 2 else "x")
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
    groups, infos = batch(model_dir, truncate=algo_name == "flowrl_drop")
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


def resume_then_step(model_dir, algo_name, root, rank=0, world=1, port=0):
    """Load the newest checkpoint under ``root``, written by any number of ranks, then take
    one step."""
    from flowrl_async.learner import checkpoint as ckpt

    learner, head = make(model_dir, algo_name, rank, world, port)
    ckpt.load(ckpt.latest(root), learner)  # every rank reads its shards
    return snapshot(learner, head, learner.step())


def step_save_step(model_dir, algo_name, root, rank=0, world=1, port=0):
    """One step, a checkpoint under ``root`` (every rank writes its shards), one more step."""
    from flowrl_async.learner import checkpoint as ckpt
    from flowrl_async.learner.batch import probe_batch
    from flowrl_async.model import load_tokenizer

    learner, head = make(model_dir, algo_name, rank, world, port)
    learner.step()
    ckpt.save(root, learner, load_tokenizer(model_dir))
    with torch.no_grad():  # the checkpointed policy's log-prob of PROBE (every rank joins)
        probe = float(learner.policy_fwd(probe_batch(PROBE), 1.0, False).logprobs.sum())
    return {**snapshot(learner, head, learner.step()), "probe": probe}


def publish_once(model_dir, weight_port, rank=0, world=1, port=0):
    """Rank 0 joins a weight group with the test process; every rank publishes in bf16,
    in buckets of 64 KB gathered one at a time."""
    from flowrl_async.learner.weight_sender import WeightSender
    from flowrl_async.weights import new_group

    learner, _ = make(model_dir, "flowrl", rank, world, port, dtype=torch.bfloat16)
    learner.bucket_bytes = 64 * 1024
    if rank == 0:
        sender = WeightSender(new_group("127.0.0.1", weight_port, 0, 2, timeout_s=60))

        def send(version, probe_ids, probe, buckets, gathered):
            publication = sender.start(buckets, version, probe_ids, probe)
            for bucket, tensors in gathered:
                publication.send(bucket, tensors)
            publication.finish()

        learner.publish_fn = send
    learner.publish()
    return {"version": learner.version}


def rank_main(fn, args, rank, world, port, queue, kwargs=None):
    import torch.distributed as dist

    out = fn(*args, rank, world, port, **(kwargs or {}))
    dist.barrier()
    dist.destroy_process_group()  # before exit: the group's threads stop first
    if rank == 0:
        queue.put({k: ({n: t.numpy() for n, t in v.items()} if isinstance(v, dict) else v)
                   for k, v in out.items()})  # fmt: skip
        queue.close()
        queue.join_thread()  # the result is in the pipe
    # no interpreter teardown: once in a suite run a rank aborted there (SIGABRT), after
    # its work and result were done (seen 2026-12-02, not reproduced in 18 reruns)
    os._exit(0)


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
def test_a_sharded_checkpoint_resumes_exactly_and_on_another_number_of_ranks(tmp_path):
    # 2 ranks: step, checkpoint, step == 2 ranks: load, step (exactly) == 1 rank: load,
    # step (2 -> 1); 1 rank: step, checkpoint, step == 2 ranks: load it, step (1 -> 2)
    from flowrl_async.learner.checkpoint import latest
    from flowrl_async.model import load_policy

    model_dir = str(build_tiny_model(tmp_path / "m", seed=2))
    two = on_two_ranks(step_save_step, (model_dir, "flowrl", str(tmp_path / "two")))
    two_again = on_two_ranks(resume_then_step, (model_dir, "flowrl", str(tmp_path / "two")))
    assert all(np.array_equal(two["params"][k], two_again["params"][k]) for k in two["params"])
    one_after = resume_then_step(model_dir, "flowrl", str(tmp_path / "two"))
    print("2 -> 1", relative(two["params"], one_after["params"]))
    assert relative(two["params"], one_after["params"]) < 1e-6

    one = step_save_step(model_dir, "flowrl", str(tmp_path / "one"))
    two_after = on_two_ranks(resume_then_step, (model_dir, "flowrl", str(tmp_path / "one")))
    print("1 -> 2", relative(one["params"], two_after["params"]))
    assert relative(one["params"], two_after["params"]) < 1e-6
    # each rank wrote its shards; rank 0 exported the gathered policy for transformers
    written = latest(tmp_path / "two")
    assert sorted(p.name for p in written.iterdir()) == [
        "extra.json", "policy", "rng-0.pt", "rng-1.pt", "state", "trainer.pt"
    ]  # fmt: skip
    assert len(list((written / "state").glob("*.distcp"))) == 2
    exported = load_policy(written / "policy").state_dict()
    before = make(model_dir, "flowrl")[0].policy.state_dict()
    assert set(exported) == set(before) and any(
        not torch.equal(exported[k], before[k]) for k in before
    )  # the trained weights, not the initial ones
    from flowrl_async.actors.vllm_generator import VLLMGenerator

    engine = VLLMGenerator(str(written / "policy"), max_model_len=64)  # vLLM loads the export
    print("export: vLLM", engine.probe_logprob(PROBE), "learner", two["probe"])
    assert engine.probe_logprob(PROBE) == pytest.approx(two["probe"], abs=1e-4)


@pytest.mark.integration
def test_a_sharded_learner_publishes_bucket_by_bucket_what_one_rank_holds(tmp_path):
    # two ranks gather each 64 KB bucket in turn, rank 0 broadcasts it: the receiver gets
    # the full weights in bf16, bit for bit, in more than one bucket
    import threading

    from flowrl_async.actors.weight_receiver import WeightReceiver
    from flowrl_async.model import load_policy
    from flowrl_async.weights import new_group

    model_dir = str(build_tiny_model(tmp_path / "m", seed=2))
    weight_port, got = free_port(), {}

    def receive():
        receiver = WeightReceiver(new_group("127.0.0.1", weight_port, 1, 2, timeout_s=60))
        got["publication"] = receiver.wait(timeout=120)

    thread = threading.Thread(target=receive)
    thread.start()
    assert on_two_ranks(publish_once, (model_dir, weight_port))["version"] == 1
    thread.join(60)
    publication = got["publication"]
    expected = load_policy(model_dir)
    expected.model.layers[0].mlp.up_proj.weight.data.mul_(1.5)  # as make() does
    received = dict(publication.named_tensors())
    assert publication.header.version == 1 and len(publication.header.buckets) > 4
    assert set(received) == set(expected.state_dict())
    for name, t in expected.state_dict().items():
        assert received[name].dtype == torch.bfloat16
        assert torch.equal(received[name], t.to(torch.bfloat16)), name


@pytest.mark.integration
def test_bf16_compute_keeps_fp32_master_weights_and_the_same_update(tmp_path):
    # bf16 compute (autocast on one rank, FSDP2 mixed precision on two): the gradient is
    # the fp32 one within bf16's rounding, the master weights stay float32
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


def failing_checkpoint(model_dir, root, rank=0, world=1, port=0):
    """Rank 1's part fails (a full disk); then rank 1 sees another directory than rank 0's
    (no shared file system): both times every rank raises, and nothing is kept."""
    from flowrl_async.learner import checkpoint as ckpt
    from flowrl_async.model import load_tokenizer

    learner, _ = make(model_dir, "flowrl", rank, world, port)
    learner.step()
    tok, errors = load_tokenizer(model_dir), []
    if rank == 1:

        def full_disk(directory):
            raise OSError("No space left on device")

        learner.save_local_state = full_disk
    for where in (root, f"{root}-rank{rank}" if rank else root):
        try:
            ckpt.save(where, learner, tok)
        except (OSError, RuntimeError) as e:
            errors.append(str(e))
        learner.save_local_state = type(learner).save_local_state.__get__(learner)
    learner.step()  # the ranks are still in step with each other
    return {"errors": errors, "kept": [p.name for p in ckpt.checkpoints(root)]}


@pytest.mark.integration
def test_a_checkpoint_that_fails_on_one_rank_fails_on_every_rank(tmp_path):
    model_dir = str(build_tiny_model(tmp_path / "m", seed=2))
    out = on_two_ranks(failing_checkpoint, (model_dir, str(tmp_path / "c")))
    assert out["kept"] == []
    assert "another learner rank failed" in out["errors"][0]
    assert "shared file system" in out["errors"][1]
