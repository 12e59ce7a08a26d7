"""WeightSender: publishes the policy's weights on the weight group (learner = rank 0).

One publication = header length, header, then every bucket (flowrl_async.weights). A
publication streams: ``start`` sends the header of a bucket plan, ``Publication.send`` one
bucket's tensors at a time (a sharded learner gathers each bucket just before it is sent),
``finish`` waits for the wire. Rules:
- buckets whose tensors lie in the publication layout (``weights.share_storage``) go as they
  are; the others are packed into one of two staging buffers, so the next bucket is packed
  while the previous is on the wire, and a publication never holds more than two packed
  buckets (collectives keep their order);
- after a failed send, the rest of the publication's ``send`` calls do nothing (the caller
  keeps gathering: the other learner ranks are in those gathers) and ``finish`` raises.
"""

from __future__ import annotations

import torch

from flowrl_async.weights import (
    DEFAULT_BUCKET_BYTES,
    STOP,
    Bucket,
    Header,
    broadcast,
    bucket_view,
    pack_bucket,
    plan_buckets,
)


class WeightSender:
    """Publishes the policy's weights on the weight group, bucket by bucket."""

    def __init__(self, group, bucket_bytes: int = DEFAULT_BUCKET_BYTES, device: str = "cpu"):
        self.group, self.bucket_bytes, self.device = group, bucket_bytes, device
        self._staging: list[torch.Tensor | None] = [None, None]  # raw bytes, reused

    def publish(
        self,
        named_tensors: list[tuple[str, torch.Tensor]],
        version: int,
        probe_token_ids: tuple[int, ...] = (),
        probe_logprob: float = 0.0,
    ) -> int:
        """Broadcast weights already at hand; -> bytes sent."""
        buckets = plan_buckets(named_tensors, self.bucket_bytes)
        tensors = dict(named_tensors)
        publication = self.start(buckets, version, probe_token_ids, probe_logprob)
        for bucket in buckets:
            publication.send(bucket, tensors)
        return publication.finish()

    def start(self, buckets: tuple[Bucket, ...], version: int,
              probe_token_ids: tuple[int, ...] = (), probe_logprob: float = 0.0,
              ) -> Publication:  # fmt: skip
        """Send the header of a publication of ``buckets``; -> the publication to fill."""
        header = Header(version, buckets, tuple(probe_token_ids), probe_logprob).to_bytes()
        broadcast(self.group, torch.tensor([len(header)], dtype=torch.int64, device=self.device))
        broadcast(self.group, torch.frombuffer(bytearray(header), dtype=torch.uint8).to(self.device))
        return Publication(self)

    def staging(self, slot: int, bucket: Bucket) -> torch.Tensor:
        """Staging buffer ``slot`` (0 or 1) as a flat tensor of ``bucket``'s dtype and size."""
        nbytes = bucket.numel * bucket.dtype.itemsize
        buf = self._staging[slot]
        if buf is None or buf.numel() < nbytes:
            buf = self._staging[slot] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return buf[:nbytes].view(bucket.dtype)

    def stop(self) -> None:
        """Tell every receiver to end its receive loop."""
        broadcast(self.group, torch.tensor([STOP], dtype=torch.int64, device=self.device))


class Publication:
    """One publication being sent: buckets in plan order, then ``finish``."""

    def __init__(self, sender: WeightSender):
        self.sender = sender
        self.sent, self.error = 0, None
        self._works: list = []  # every bucket's broadcast, in order
        self._packed = 0
        self._last_use: list = [None, None]  # the broadcast that last read each staging slot

    def send(self, bucket: Bucket, tensors: dict[str, torch.Tensor]) -> None:
        """Broadcast one bucket (the next of the plan) from ``tensors`` (name -> full tensor)."""
        if self.error is not None:
            return
        try:
            flat = bucket_view(bucket, tensors)
            slot = None
            if flat is None:  # packed into the staging slot the bucket two back used
                slot, self._packed = self._packed % 2, self._packed + 1
                if self._last_use[slot] is not None:
                    self._last_use[slot].wait()
                flat = pack_bucket(bucket, tensors, out=self.sender.staging(slot, bucket))
            work = broadcast(self.sender.group, flat, wait=False)
            self._works.append(work)
            if slot is not None:
                self._last_use[slot] = work
            self.sent += flat.numel() * flat.element_size()
        except Exception as e:  # gloo/NCCL raise RuntimeError subclasses of many kinds
            self.error = e

    def finish(self) -> int:
        """Wait until every bucket is on the wire; -> bytes sent (raises the first error)."""
        for work in self._works:
            if self.error is None:
                try:
                    work.wait()
                except Exception as e:
                    self.error = e
        self._works = []
        if self.error is not None:
            raise self.error
        return self.sent
