"""A publication streamed bucket by bucket: at most two broadcasts in flight, and after a
failed one nothing posted may still be reading a buffer the caller reuses."""

import pytest
import torch

from flowrl_async.learner.weight_sender import WeightSender
from flowrl_async.weights import plan_buckets


class Work:
    def __init__(self, log, i):
        self.log, self.i = log, i

    def wait(self):
        self.log.append(("wait", self.i))
        return True


class Group:
    """broadcast() as a ProcessGroup has it; the broadcast numbered ``fail_at`` raises."""

    def __init__(self, fail_at=None):
        self.log, self.count, self.fail_at = [], 0, fail_at

    def broadcast(self, tensors, opts):
        self.count += 1
        if self.count == self.fail_at:
            raise RuntimeError("Connection reset by peer")
        self.log.append(("post", self.count))
        return Work(self.log, self.count)


def named(n=5):
    return [(f"w{i}", torch.full((4,), float(i))) for i in range(n)]


def test_each_send_returns_once_the_broadcast_before_it_is_done():
    group = Group()
    sender = WeightSender(group, bucket_bytes=16)  # one tensor a bucket
    buckets = plan_buckets(named(), 16)
    publication = sender.start(buckets, 1)  # broadcasts 1 and 2: the header's
    tensors = dict(named())
    publication.send(buckets[0], tensors)  # broadcast 3
    assert group.log[-1] == ("post", 3)
    publication.send(buckets[1], tensors)  # broadcast 4, then wait for 3
    assert group.log[-2:] == [("post", 4), ("wait", 3)]
    for b in buckets[2:]:
        publication.send(b, tensors)
    assert publication.finish() == 5 * 4 * 4


def test_after_a_failed_broadcast_every_posted_one_is_waited_and_finish_raises():
    group = Group(fail_at=6)  # the header (1, 2), buckets 3, 4, 5, then 6 fails
    sender = WeightSender(group, bucket_bytes=16)
    buckets = plan_buckets(named(), 16)
    publication = sender.start(buckets, 1)
    tensors = dict(named())
    for b in buckets[:4]:
        publication.send(b, tensors)
    waited = {i for what, i in group.log if what == "wait"}
    assert waited >= {3, 4, 5}  # nothing in flight may read a buffer the caller reuses
    before = list(group.log)
    publication.send(buckets[4], tensors)  # a no-op now
    assert group.log == before
    with pytest.raises(RuntimeError, match="Connection reset"):
        publication.finish()
