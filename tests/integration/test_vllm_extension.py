"""The engine-process weight path (the shape vLLM has on GPU), run here on CPU: vLLM's
engine in a process of its own, the weight group member inside it (worker extension, joined
through collective_rpc), a publication broadcast from this process over gloo, loaded inside
the engine and proven by the probe."""

import threading

import numpy as np
import pytest
import torch

from flowrl_async.actors.generator import SampleSpec, WeightLoadError, check_probe
from flowrl_async.model import build_tiny_model, load_policy, sequence_logprob
from flowrl_async.net import free_port
from flowrl_async.weights import new_group

PROMPT = [1, 20, 21, 22]


def teacher_forced(model, prompt, tokens, temperature) -> np.ndarray:
    ids = torch.tensor([prompt + list(tokens)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None])[:, 0].numpy()


@pytest.mark.integration
def test_weights_reach_a_vllm_engine_process_through_the_extension(tmp_path):
    from flowrl_async.actors.vllm_generator import VLLMGenerator
    from flowrl_async.learner.weight_sender import WeightSender

    a, b = build_tiny_model(tmp_path / "a", seed=0), build_tiny_model(tmp_path / "b", seed=1)
    gen = VLLMGenerator(str(a), max_model_len=64, engine_process=True)
    port, joined = free_port(), {}
    learner_side = threading.Thread(
        target=lambda: joined.update(group=new_group("127.0.0.1", port, 0, 2, timeout_s=60))
    )
    learner_side.start()
    receiver = gen.join_weight_group("127.0.0.1", port, 1, 2, "gloo")
    learner_side.join(60)
    assert receiver.take() is None  # nothing published yet

    model_b = load_policy(b)
    expected = sequence_logprob(model_b, PROMPT)
    sender = WeightSender(joined["group"], bucket_bytes=1 << 20)  # several buckets
    named = [(n, t.detach()) for n, t in model_b.state_dict().items()]
    sender.publish(named, 7, tuple(PROMPT), expected)
    for _ in range(500):  # the engine's receiver thread completes the publication
        publication = receiver.take()
        if publication is not None:
            break
        threading.Event().wait(0.02)
    assert publication is not None and publication.header.version == 7
    publication.load_into(gen)
    got = check_probe(gen, PROMPT, publication.header.probe_logprob, 1e-4)
    assert abs(got - expected) < 1e-4
    # generation now follows the new weights: recorded log-probs = teacher forcing under b
    out = gen.generate([PROMPT], SampleSpec(n=4, temperature=0.7, top_p=1.0, max_tokens=6))[0]
    for c in out:
        np.testing.assert_allclose(
            c.logprobs, teacher_forced(model_b, PROMPT, c.token_ids.tolist(), 0.7), atol=1e-4
        )
    # and the probe still catches a load that does not match what the learner sent
    with pytest.raises(WeightLoadError):
        check_probe(gen, PROMPT, sequence_logprob(load_policy(a), PROMPT), 1e-4)
    streams_across_a_publication(gen, receiver, sender, model_b, load_policy(a))
    sender.stop()  # the engine's receiver thread ends
    gen.close()


def streams_across_a_publication(gen, receiver, sender, old, new):
    """Streaming from an engine process: a group in flight under ``old``, a publication of
    ``new`` loaded inside the engine between two of its steps; the stream goes on, and each
    token's log-prob is the one it was sampled with (old keys and values kept). The engine
    steps on by itself, so where the switch fell is not known here (progress None): the
    log-probs must match the kept-cache computation at one switch point from 3 on, or the
    old weights alone (a response that ended before the load)."""
    spec = SampleSpec(n=2, temperature=1.0, top_p=1.0, max_tokens=10, seed=2)
    gen.submit("g", PROMPT, spec)
    for _ in range(3):
        assert gen.step() == []
    sender.publish([(n, t.detach()) for n, t in new.state_dict().items()], 8, tuple(PROMPT),
                   sequence_logprob(new, PROMPT))  # fmt: skip
    for _ in range(500):
        if receiver.waiting():
            break
        threading.Event().wait(0.02)
    receiver.take().load_into(gen)
    assert gen.progress() is None  # the engine steps on by itself: counts not known here
    check_probe(gen, PROMPT, sequence_logprob(new, PROMPT), 1e-4)
    finished = []
    while not finished:
        finished = gen.step()
    ((_, group),) = finished
    assert any(len(c.token_ids) > 4 for c in group)
    p = len(PROMPT)
    for c in group:
        seq = torch.tensor([PROMPT + c.token_ids.tolist()])
        matches = [np.allclose(c.logprobs, teacher_forced(old, PROMPT, c.token_ids.tolist(), 1.0),
                               atol=1e-4, rtol=0)]  # fmt: skip
        for switch in range(3, len(c.token_ids)):
            with torch.no_grad():
                head = old(input_ids=seq[:, : p + switch - 1], use_cache=True)
                tail = new(input_ids=seq[:, p + switch - 1 :], past_key_values=head.past_key_values)
            logits = torch.cat([head.logits[0, p - 1 :], tail.logits[0, :-1]])
            want = torch.log_softmax(logits.float(), -1).gather(-1, seq[0, p:, None])[:, 0]
            matches.append(np.allclose(c.logprobs, want.numpy(), atol=1e-4, rtol=0))
        assert any(matches), "no switch point explains the recorded log-probs"


class GlooTP:
    """vLLM's TP group coordinator as share_publication uses it, over a gloo group."""

    def __init__(self, rank: int, world: int):
        self.rank_in_group, self.world_size = rank, world

    def broadcast(self, tensor, src=0):
        import torch.distributed as dist

        dist.broadcast(tensor, src)
        return tensor


def _tp_worker(rank, port, queue):
    # two "TP workers": rank 0 holds a publication (or an error, or nothing), both share it
    import torch.distributed as dist

    from flowrl_async.actors.vllm_extension import share_publication
    from flowrl_async.actors.weight_receiver import Publication
    from flowrl_async.weights import Header, plan_buckets

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)  # fmt: skip
    tp, cpu = GlooTP(rank, 2), torch.device("cpu")
    named = [(f"w{i}", torch.arange(i * 10, i * 10 + 6, dtype=torch.bfloat16).view(2, 3))
             for i in range(5)]  # fmt: skip
    buckets = plan_buckets(named, bucket_bytes=24)  # several buckets
    flats = [torch.cat([dict(named)[s.name].reshape(-1) for s in b.slots]) for b in buckets]
    outs = []
    for offer in ("publication", None, "error"):
        got = None
        if rank == 0 and offer == "publication":
            got = Publication(Header(7, buckets, (1, 2), -3.5), flats)
        elif rank == 0 and offer == "error":
            got = {"error": "the weight group broke"}
        shared = share_publication(tp, got, cpu)
        if isinstance(shared, Publication):
            outs.append((shared.header.version, shared.header.probe_logprob,
                         [(n, t.float().tolist()) for n, t in shared.named_tensors()]))  # fmt: skip
        else:
            outs.append(shared)
    queue.put((rank, outs))
    dist.destroy_process_group()


@pytest.mark.integration
def test_tensor_parallel_workers_load_what_tp_rank_0_received():
    import multiprocessing as mp

    ctx, port = mp.get_context("spawn"), free_port()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_tp_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    expected = [(f"w{i}", [[float(i * 10 + j) for j in range(3)],
                           [float(i * 10 + 3 + j) for j in range(3)]]) for i in range(5)]  # fmt: skip
    assert got[0] == got[1]  # both workers: the same publication, nothing, the same error
    assert got[1] == [(7, -3.5, expected), None, {"error": "the weight group broke"}]
