"""GPU paths, for the day a GPU is lent (skipped without CUDA by conftest): vLLM on CUDA, the
learner on CUDA, and an NCCL weight group (needs two GPUs)."""

import multiprocessing as mp

import numpy as np
import pytest
import torch

from flowrl_async.actors.generator import SampleSpec, check_probe
from flowrl_async.model import build_tiny_model, load_policy

pytestmark = pytest.mark.gpu


def test_vllm_on_cuda_matches_transformers_and_reloads(tmp_path):
    from flowrl_async.actors.vllm_generator import VLLMGenerator

    a, b = build_tiny_model(tmp_path / "a", seed=0), build_tiny_model(tmp_path / "b", seed=1)
    gen = VLLMGenerator(str(a), max_model_len=64, gpu_memory_utilization=0.2)
    prompt = [1, 20, 21, 22]
    out = gen.generate([prompt], SampleSpec(n=4, temperature=0.7, top_p=1.0, max_tokens=6))[0]
    model = load_policy(a, device="cuda")
    for c in out:
        ids = torch.tensor([prompt + c.token_ids.tolist()], device="cuda")
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / 0.7
        lp = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None]).squeeze(-1)
        np.testing.assert_allclose(c.logprobs, lp.cpu().numpy(), atol=1e-3)
    gen.load_weights(load_policy(b).state_dict().items())
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logits = load_policy(b)(input_ids=ids).logits[0, :-1]
    expected = float(torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).sum())
    check_probe(gen, prompt, expected, 1e-3)


def test_learner_step_on_cuda(tmp_path):
    from flowrl_async.learner.config import AlgoConfig
    from flowrl_async.learner.learner import Learner
    from flowrl_async.learner.log_z import LogZHead
    from flowrl_async.records import Group, Response
    from flowrl_async.replay.client import SampleInfo

    path = build_tiny_model(tmp_path / "m")
    policy = load_policy(path, device="cuda")
    responses = tuple(
        Response(
            np.array([5, 6, 2], np.int32), np.full(3, -2.0, np.float32), float(i), "stop", 0, 0
        )
        for i in range(4)
    )
    groups = [Group("g", 0, np.array([1, 20, 21], np.int32), "t", responses)]
    learner = Learner(policy, load_policy(path, device="cuda"),
                      LogZHead(policy.config.hidden_size).cuda(), AlgoConfig(beta=1.0),
                      lambda b, v: (groups, [SampleInfo(1, 0, 0.0)]), pad_token_id=0,
                      batch_groups=1, device="cuda")  # fmt: skip
    losses = [learner.step()["loss"] for _ in range(5)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def _nccl_rank(rank, port, queue):
    from flowrl_async.weights import broadcast, new_group

    torch.cuda.set_device(rank)
    group = new_group("127.0.0.1", port, rank, 2, backend="nccl")
    t = (
        torch.arange(10, dtype=torch.float32, device="cuda")
        if rank == 0
        else torch.zeros(10, device="cuda")
    )
    broadcast(group, t)
    queue.put((rank, t.cpu().tolist()))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between ranks needs two GPUs")
def test_nccl_weight_group_broadcasts():
    from flowrl_async.net import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_nccl_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    assert got[1] == list(map(float, range(10)))
