"""WeightReceiver: receives publications on a background thread into staging buffers.

The actor's loop calls ``take()`` between generation batches: it returns the newest complete
publication (older ones not yet taken are dropped) or None. Receiving never blocks
generation; loading happens only in the actor's thread.

Invariants: a publication is visible to ``take`` only once every bucket has arrived; a
publication is never returned twice; an error in the receive thread is raised by the next
``take`` instead of being lost.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from flowrl_async.weights import STOP, Header, broadcast, unpack


class WeightLinkError(RuntimeError):
    """The weight group broke (a member died): wait for the orchestrator to re-form it."""


@dataclass
class Publication:
    header: Header
    buckets: list[torch.Tensor]

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return unpack(self.header.buckets, self.buckets)


class WeightReceiver:
    def __init__(self, group, device: str = "cpu"):
        self.group, self.device = group, device
        self._lock = threading.Lock()
        self._latest: Publication | None = None
        self._error: BaseException | None = None
        self.stopped = threading.Event()
        self.received = 0
        self._thread = threading.Thread(target=self._run, name="weight-receiver", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                length = torch.zeros(1, dtype=torch.int64, device=self.device)
                broadcast(self.group, length)
                if int(length) == STOP:
                    return
                raw = torch.empty(int(length), dtype=torch.uint8, device=self.device)
                broadcast(self.group, raw)
                header = Header.from_bytes(bytes(raw.cpu().numpy()))
                buckets = []
                for bucket in header.buckets:
                    flat = torch.empty(bucket.numel, dtype=bucket.dtype, device=self.device)
                    broadcast(self.group, flat)
                    buckets.append(flat)
                with self._lock:
                    self._latest = Publication(header, buckets)
                    self.received += 1
        except BaseException as e:  # surfaced by take()
            self._error = e
        finally:
            self.stopped.set()

    def take(self) -> Publication | None:
        with self._lock:
            latest, self._latest = self._latest, None
        if latest is None and self._error is not None:
            raise WeightLinkError(f"weight receiver failed: {self._error}") from self._error
        return latest

    def wait(self, timeout: float) -> Publication | None:
        """Block until a publication arrives (for start-up and tests)."""
        deadline = threading.Event()
        for _ in range(int(timeout * 100)):
            pub = self.take()
            if pub is not None:
                return pub
            if self.stopped.is_set():
                return self.take()
            deadline.wait(0.01)
        return None
