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


def test_chunked_logprobs_on_cuda_equal_the_unchunked_ones():
    from flowrl_async.learner.logprobs import token_logprobs

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(3, 300, 64, device="cuda", generator=g, requires_grad=True)
    weight = torch.randn(5000, 64, device="cuda", generator=g, requires_grad=True)
    targets = torch.randint(0, 5000, (3, 300), device="cuda", generator=g)
    out = {}
    for chunk in (None, 128):
        lp, ent = token_logprobs(hidden, weight, None, targets, 0.7, chunk)
        gh, gw = torch.autograd.grad(lp.sum(), (hidden, weight))
        out[chunk] = (lp.detach(), ent, gh, gw)
    for a, b in zip(out[None], out[128], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_qwen2_shaped_model_in_vllm_on_cuda(tmp_path):
    # the 0.5B shape in bf16: vLLM's sampled log-probs match the learner's bf16 forward
    from flowrl_async.actors.vllm_generator import VLLMGenerator
    from flowrl_async.qwen2_shape import build_qwen2_shape

    path = build_qwen2_shape(tmp_path / "q", ["sum 4 len 3: 121", "sum 9 len 2: 45"])
    gen = VLLMGenerator(str(path), dtype="bfloat16", max_model_len=512, gpu_memory_utilization=0.3)
    prompt = [1, 300, 301, 302]
    import time

    started = time.perf_counter()
    outs = gen.generate([prompt] * 4, SampleSpec(n=4, temperature=1.0, top_p=1.0, max_tokens=128))
    tokens = sum(len(c.token_ids) for group in outs for c in group)
    print(
        f"vLLM on CUDA, Qwen2-0.5B shape, bf16: {tokens / (time.perf_counter() - started):.0f} tok/s"
    )
    model = load_policy(path, dtype=torch.bfloat16, device="cuda")
    c = outs[0][0]
    ids = torch.tensor([prompt + c.token_ids.tolist()], device="cuda")
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None]).squeeze(-1)
    assert float((lp.cpu() - torch.as_tensor(c.logprobs)).abs().mean()) < 5e-2


def _learner_rank(rank, world, port, model_dir, queue):
    from flowrl_async.learner.sharding import Ranks, full_tensor

    torch.cuda.set_device(rank)
    ranks = Ranks.join("127.0.0.1", port, rank, world, "nccl", "cuda") if world > 1 else None
    learner = _cuda_learner(model_dir, ranks)
    learner.step()
    params = {
        n: full_tensor(p.detach()).float().cpu() for n, p in learner.policy.named_parameters()
    }
    if rank == 0:
        queue.put(params)
    if ranks is not None:
        ranks.close()


def _cuda_learner(model_dir, ranks):
    from flowrl_async.learner.config import AlgoConfig
    from flowrl_async.learner.learner import Learner
    from flowrl_async.learner.log_z import LogZHead
    from flowrl_async.records import Group, Response
    from flowrl_async.replay.client import SampleInfo

    torch.manual_seed(0)
    policy, ref = load_policy(model_dir, device="cuda"), load_policy(model_dir, device="cuda")
    policy.model.layers[0].mlp.up_proj.weight.data.mul_(1.5)
    g = np.random.default_rng(0)
    groups = [Group(f"g{k}", k, np.array([1, 20 + k, 21], np.int32), "t", tuple(
        Response(g.integers(3, 60, 2 + j).astype(np.int32), np.full(2 + j, -2.0, np.float32),
                 float(j % 2), "stop", 0, 0) for j in range(4))) for k in range(4)]  # fmt: skip
    return Learner(policy, ref, LogZHead(policy.config.hidden_size).cuda(), AlgoConfig(beta=1.0),
                   lambda b, v: (groups, [SampleInfo(1, 0, 0.0)] * 4), pad_token_id=0,
                   batch_groups=4, micro_batch=3, logprob_chunk=5, device="cuda",
                   ranks=ranks, param_dtype=torch.bfloat16)  # fmt: skip


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP2 over NCCL needs two GPUs")
def test_fsdp2_learner_on_two_gpus_makes_the_one_gpu_update(tmp_path):
    from flowrl_async.net import free_port

    model_dir = str(build_tiny_model(tmp_path / "m", seed=2))
    ctx = mp.get_context("spawn")
    results = []
    for world in (1, 2):
        queue, port = ctx.Queue(), free_port()
        procs = [ctx.Process(target=_learner_rank, args=(r, world, port, model_dir, queue))
                 for r in range(world)]  # fmt: skip
        for p in procs:
            p.start()
        results.append(queue.get(timeout=300))
        for p in procs:
            p.join(60)
    one, two = results
    num = sum(float(((one[k] - two[k]) ** 2).sum()) for k in one)
    den = sum(float((one[k] ** 2).sum()) for k in one)
    assert (num / den) ** 0.5 < 1e-3  # bf16 compute on both sides, fp32 master weights


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="tensor parallelism needs two GPUs")
def test_vllm_tensor_parallel_engine_loads_a_publication(tmp_path):
    import threading

    from flowrl_async.actors.vllm_generator import VLLMGenerator
    from flowrl_async.learner.weight_sender import WeightSender
    from flowrl_async.model import sequence_logprob
    from flowrl_async.net import free_port
    from flowrl_async.weights import new_group

    a, b = build_tiny_model(tmp_path / "a", seed=0), build_tiny_model(tmp_path / "b", seed=1)
    gen = VLLMGenerator(str(a), max_model_len=64, engine_process=True, tensor_parallel_size=2,
                        gpu_memory_utilization=0.2)  # fmt: skip
    port, joined = free_port(), {}
    side = threading.Thread(target=lambda: joined.update(g=new_group("127.0.0.1", port, 0, 2)))
    side.start()
    receiver = gen.join_weight_group("127.0.0.1", port, 1, 2, "gloo")
    side.join(60)
    policy = load_policy(b)
    prompt = [1, 20, 21, 22]
    expected = sequence_logprob(policy, prompt)
    WeightSender(joined["g"], bucket_bytes=1 << 20).publish(
        list(policy.state_dict().items()), 3, tuple(prompt), expected
    )
    loaded = None
    for _ in range(600):
        loaded = receiver.take()
        if loaded is not None:
            break
        threading.Event().wait(0.05)
    assert loaded is not None and loaded.header.version == 3
    loaded.load_into(gen)
    check_probe(gen, prompt, expected, 1e-3)  # both TP shards hold the new weights
