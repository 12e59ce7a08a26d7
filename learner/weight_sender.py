"""WeightSender: publishes the policy's weights on the weight group (learner = rank 0).

One publication = header length, header, then every bucket (flowrl_async.weights). A
publication streams: ``start`` sends the header of a bucket plan, ``Publication.send`` one
bucket's tensors at a time (a sharded learner gathers each bucket just before it is sent),
``finish`` waits for the wire. Rules:
- buckets whose tensors lie in the publication layout (``weights.share_storage``), and
  buckets handed over already laid out (a sharded learner's gathers), go as they are; the
  others are packed into one of two staging buffers;
- at most two broadcasts are in flight: ``send`` returns once the one before its own is
  done, so the next bucket is gathered or packed while the previous is on the wire, and a
  buffer is free again two buckets later (collectives keep their order);
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
        broadcast(
            self.group, torch.frombuffer(bytearray(header), dtype=torch.uint8).to(self.device)
        )
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

    def send(self, bucket: Bucket, tensors: dict[str, torch.Tensor] | torch.Tensor) -> None:
        """Broadcast one bucket (the next of the plan): ``tensors`` (name -> full tensor) or
        the bucket already laid out as one flat tensor. Returns once the broadcast of the
        bucket before this one is done, so a buffer is free again two buckets later."""
        if self.error is not None:
            return
        try:
            flat = tensors if torch.is_tensor(tensors) else bucket_view(bucket, tensors)
            if flat is None:  # packed into the staging buffer the bucket two back used
                slot, self._packed = self._packed % 2, self._packed + 1
                flat = pack_bucket(bucket, tensors, out=self.sender.staging(slot, bucket))
            self._works.append(broadcast(self.sender.group, flat, wait=False))
            self.sent += flat.numel() * flat.element_size()
            if len(self._works) > 1:
                self._works[-2].wait()
        except Exception as e:  # gloo/NCCL raise RuntimeError subclasses of many kinds
            self.error = e
            self._settle()  # the caller reuses buffers next: nothing may still read them

    def _settle(self) -> None:
        """Wait for every broadcast posted, ignoring their errors."""
        for work in self._works:
            try:
                work.wait()
            except Exception:
                pass
        self._works = []

    def finish(self) -> int:
        """Wait until every bucket is on the wire; -> bytes sent (raises the first error)."""
        for work in self._works:
            try:
                work.wait()
            except Exception as e:
                self.error = self.error or e
        self._works = []
        if self.error is not None:
            raise self.error
        return self.sent
