"""WeightSender: publishes the policy's weights on the weight group (learner = rank 0).

One publication = header length, header, then every bucket (flowrl_async.weights). The
bucket plan is computed once per parameter signature and reused; staging buffers are reused
too, so a publication allocates nothing after the first.
"""

from __future__ import annotations

import torch

from flowrl_async.weights import (
    DEFAULT_BUCKET_BYTES,
    STOP,
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
        self._signature = None
        self._buckets = ()
        self._staging: list[torch.Tensor | None] = []

    def publish(
        self,
        named_tensors: list[tuple[str, torch.Tensor]],
        version: int,
        probe_token_ids: tuple[int, ...] = (),
        probe_logprob: float = 0.0,
    ) -> int:
        """Broadcast the weights; -> bytes sent."""
        signature = tuple((n, tuple(t.shape), t.dtype) for n, t in named_tensors)
        if signature != self._signature:
            self._buckets = plan_buckets(named_tensors, self.bucket_bytes)
            self._staging = [None] * len(self._buckets)  # allocated when a bucket is packed
            self._signature = signature
        header = Header(version, self._buckets, tuple(probe_token_ids), probe_logprob).to_bytes()
        self._send_header(header)
        tensors = dict(named_tensors)
        sent, works = 0, []
        for i, bucket in enumerate(self._buckets):
            # weights kept in the publication layout (weights.share_storage) go as they are;
            # others are packed, each bucket into its own staging buffer, so the next one is
            # packed while the previous ones are on the wire (collectives keep their order)
            flat = bucket_view(bucket, tensors)
            if flat is None:
                if self._staging[i] is None:
                    self._staging[i] = torch.empty(bucket.numel, dtype=bucket.dtype,
                                                   device=self.device)  # fmt: skip
                flat = pack_bucket(bucket, tensors, out=self._staging[i])
            works.append(broadcast(self.group, flat, wait=False))
            sent += flat.numel() * flat.element_size()
        for work in works:
            work.wait()
        return sent

    def _send_header(self, header: bytes) -> None:
        broadcast(self.group, torch.tensor([len(header)], dtype=torch.int64, device=self.device))
        data = torch.frombuffer(bytearray(header), dtype=torch.uint8).to(self.device)
        broadcast(self.group, data)

    def stop(self) -> None:
        """Tell every receiver to end its receive loop."""
        broadcast(self.group, torch.tensor([STOP], dtype=torch.int64, device=self.device))
