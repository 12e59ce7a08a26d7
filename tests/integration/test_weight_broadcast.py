"""Weight publication across real processes on a gloo group."""

import multiprocessing as mp
import socket
import time

import pytest
import torch

from flowrl_async.weights import Header, new_group, plan_buckets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_state(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        ("embed.weight", torch.randn(64, 32, generator=g)),
        ("layer.0.w", torch.randn(32, 32, generator=g).to(torch.bfloat16)),
        ("layer.0.b", torch.randn(32, generator=g, dtype=torch.float64)),
        ("layer.1.w", torch.randn(32, 48, generator=g)),
        ("steps", torch.arange(5, dtype=torch.int64)),
        ("head.weight", torch.randn(64, 32, generator=g).to(torch.float16)),
    ]


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def receiver_main(port, rank, world, n_pubs, queue):
    torch.set_num_threads(1)
    from flowrl_async.actors.weight_receiver import WeightReceiver

    try:
        receiver = WeightReceiver(new_group("127.0.0.1", port, rank, world, timeout_s=60))
        got = []
        for _ in range(n_pubs):
            pub = receiver.wait(60)
            named = pub.named_tensors()
            got.append(
                (
                    pub.header.version,
                    pub.header.probe_logprob,
                    # plain bytes: torch tensors in a multiprocessing queue travel as file
                    # descriptors that vanish when this process exits before they are read
                    [(n, str(t.dtype), raw(t)) for n, t in named],
                    [b.data_ptr() for b in pub.buckets],
                )
            )
            pub.release()  # the next publication of the same layout reuses these buffers
        receiver.stopped.wait(60)
        queue.put((rank, got))
    except BaseException as e:
        queue.put((rank, repr(e)))


def run_publications(bucket_bytes, world, seeds, in_place=False):
    """``in_place``: the sender's tensors live in the publication layout (share_storage),
    so buckets are sent as they are instead of being packed."""
    from flowrl_async.learner.weight_sender import WeightSender
    from flowrl_async.weights import share_storage

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [
        ctx.Process(target=receiver_main, args=(port, r, world, len(seeds), queue))
        for r in range(1, world)
    ]
    for p in procs:
        p.start()
    sender = WeightSender(new_group("127.0.0.1", port, 0, world, timeout_s=60), bucket_bytes)
    for version, seed in enumerate(seeds, start=1):
        state = make_state(seed)
        if in_place:
            assert share_storage(state, bucket_bytes) == len(plan_buckets(state, bucket_bytes))
        sender.publish(state, version, (1, 2, 3), probe_logprob=-1.5 * version)
        # the receivers keep only the newest untaken publication, so pace them one by one
        time.sleep(0.5)
    sender.stop()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    return results


@pytest.mark.integration
@pytest.mark.parametrize("in_place", [False, True], ids=["packed", "in-place"])
@pytest.mark.parametrize("bucket_bytes", [64, 4096, 1 << 20])
def test_every_parameter_arrives_bit_identical(bucket_bytes, in_place):
    results = run_publications(bucket_bytes, world=3, seeds=[0, 1], in_place=in_place)
    assert set(results) == {1, 2}
    for rank, got in results.items():
        assert not isinstance(got, str), f"rank {rank}: {got}"
        assert [v for v, _, _, _ in got] == [1, 2]
        assert [p for _, p, _, _ in got] == [-1.5, -3.0]
        # the second publication landed in the buffers the first one released
        assert got[0][3] == got[1][3]
        for (_, _, named, _), seed in zip(got, [0, 1], strict=True):
            expected = make_state(seed)
            assert [n for n, _, _ in named] == [n for n, _ in expected]
            for (name, dtype, data), (_, e) in zip(named, expected, strict=True):
                assert dtype == str(e.dtype), name
                assert data == raw(e), name


@pytest.mark.integration
def test_a_rebuilt_group_with_a_new_member_works():
    # first a group of 2, then (an actor joined) a fresh group of 3 on a new port
    assert set(run_publications(4096, world=2, seeds=[3])) == {1}
    results = run_publications(4096, world=3, seeds=[4])
    for got in results.values():
        assert not isinstance(got, str), got
        ((_, _, named, _),) = got
        for (name, _, data), (_, e) in zip(named, make_state(4), strict=True):
            assert data == raw(e), name


def test_bucket_plan_is_per_dtype_and_bounded():
    state = make_state(0)
    buckets = plan_buckets(state, bucket_bytes=4096)
    for b in buckets:
        size = b.numel * torch.empty(0, dtype=b.dtype).element_size()
        assert size <= 4096 or len(b.slots) == 1  # a tensor larger than a bucket is alone
    # every parameter appears once, in order within its dtype
    names = [s.name for b in buckets for s in b.slots]
    assert sorted(names) == sorted(n for n, _ in state)
    # embed 64·32 fp32 = 8192 B > 4096: alone; layer.1.w 32·48·4 = 6144 B: alone
    fp32 = [[s.name for s in b.slots] for b in buckets if b.dtype == torch.float32]
    assert fp32 == [["embed.weight"], ["layer.1.w"]]
    header = Header(7, buckets, (1, 5), -2.25)
    assert Header.from_bytes(header.to_bytes()) == header


def test_share_storage_keeps_values_and_makes_buckets_views():
    from flowrl_async.weights import bucket_view, pack_bucket, share_storage

    state = make_state(0)
    before = [(n, t.clone()) for n, t in state]
    objects = [id(t) for _, t in state]
    buckets = plan_buckets(state, 4096)
    assert share_storage(state, 4096) == len(buckets)
    assert [id(t) for _, t in state] == objects  # the same tensor objects, moved
    for (name, t), (_, e) in zip(state, before, strict=True):
        assert torch.equal(t, e), name
    tensors = dict(state)
    for b in buckets:
        view = bucket_view(b, tensors)
        assert view is not None and torch.equal(view, pack_bucket(b, tensors))
    # the views are live: an in-place update of a weight is what the next publication sends
    tensors["layer.1.w"].add_(1.0)
    (bucket,) = [b for b in buckets if b.slots[0].name == "layer.1.w"]
    assert torch.equal(bucket_view(bucket, tensors), tensors["layer.1.w"].reshape(-1))
    # a different layout (other bucket size) is not a view: it gets packed
    other = plan_buckets(state, 1 << 20)
    assert all(bucket_view(b, tensors) is None for b in other if len(b.slots) > 1)


def test_share_storage_leaves_tied_weights_to_packing_and_trains_normally(tmp_path):
    from flowrl_async.model import build_tiny_model, load_policy
    from flowrl_async.weights import bucket_view, share_storage

    model = load_policy(build_tiny_model(tmp_path / "m"))
    model.lm_head.weight = model.model.embed_tokens.weight  # tie them: one tensor, two names
    named = list(model.state_dict(keep_vars=True).items())
    buckets = plan_buckets(named, 1 << 16)
    moved = share_storage(named, 1 << 16)
    tensors = dict(model.state_dict().items())
    tied = [
        b
        for b in buckets
        if {"lm_head.weight", "model.embed_tokens.weight"} & {s.name for s in b.slots}
    ]
    assert 0 < moved == len(buckets) - len(tied)
    for b in tied:  # packed, unless the bucket is one tensor that is its own flat view
        view = bucket_view(b, tensors)
        assert view is None or len(b.slots) == 1
    # an optimizer step moves the bucket views with the parameters
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([[1, 20, 21, 22]])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    tensors = dict(model.state_dict().items())
    for b in buckets:
        view = bucket_view(b, tensors)
        if view is not None:
            for s in b.slots:
                assert torch.equal(view[s.offset : s.offset + s.numel], tensors[s.name].reshape(-1))
