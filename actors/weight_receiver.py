"""WeightReceiver: receives publications on a background thread into staging buffers.

The actor's loop calls ``take()`` between generation batches: it returns the newest complete
publication (older ones not yet taken are dropped) or None, and ``release()``s it once the
engine has copied the weights, so its buffers are reused (double buffering). Receiving never blocks
generation; loading happens only in the actor's thread.

Invariants: a publication is visible to ``take`` only once every bucket has arrived; a
publication is never returned twice; an error in the receive thread is raised by the next
``take`` instead of being lost.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

from flowrl_async.weights import STOP, Header, broadcast, unpack


class WeightLinkError(RuntimeError):
    """The weight group broke (a member died): wait for the orchestrator to re-form it."""


@dataclass
class Publication:
    """One received publication: its header and tensors."""

    header: Header
    buckets: list[torch.Tensor]
    pool: list | None = None  # where release() returns the buckets for reuse

    def release(self) -> None:
        """The engine has copied the weights: the receiver may reuse these buffers."""
        if self.buckets and self.buckets[0].is_cuda:
            # the copies were queued on the caller's stream: let them finish before the
            # receiver's stream overwrites these buffers with the next publication
            torch.cuda.current_stream(self.buckets[0].device).synchronize()
        if self.pool is not None:
            self.pool.append(self.buckets)
            self.pool = None

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return unpack(self.header.buckets, self.buckets)

    def load_into(self, generator) -> None:
        """Copy the weights into the engine, then hand the buffers back for reuse."""
        generator.load_weights(self.named_tensors())
        self.release()


class WeightReceiver:
    """Receives publications on a background thread; the newest waits to be loaded."""

    def __init__(self, group, device: str = "cpu", pool: list | None = None):
        """``pool``: released buffers to start from (e.g. the previous receiver's, when the
        group is re-formed), shared with it."""
        self.group, self.device = group, device
        self._lock = threading.Lock()
        self._latest: Publication | None = None
        self._error: BaseException | None = None
        self.stopped = threading.Event()
        self.received = 0
        # released bucket sets (list append/pop are atomic)
        self.pool: list[list[torch.Tensor]] = [] if pool is None else pool
        self._thread = threading.Thread(target=self._run, name="weight-receiver", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # NCCL work runs on a CUDA stream: on the default one, every kernel of the engine
        # (which shares the default stream) would wait behind the next pending broadcast
        stream = torch.cuda.Stream() if str(self.device).startswith("cuda") else None
        context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        try:
            with context:
                self._receive_loop(stream)
        except BaseException as e:  # surfaced by take()
            self._error = e
        finally:
            self.stopped.set()

    def _receive_loop(self, stream) -> None:
        while True:
            length = torch.zeros(1, dtype=torch.int64, device=self.device)
            broadcast(self.group, length)
            if int(length) == STOP:
                return
            raw = torch.empty(int(length), dtype=torch.uint8, device=self.device)
            broadcast(self.group, raw)
            header = Header.from_bytes(bytes(raw.cpu().numpy()))
            buckets = self._buffers(header)
            for flat in buckets:
                broadcast(self.group, flat)
            if stream is not None:
                stream.synchronize()  # the bytes are in GPU memory before anyone sees them
            with self._lock:
                dropped, self._latest = self._latest, Publication(header, buckets, self.pool)
                self.received += 1
            if dropped is not None:  # never taken: a newer one replaces it
                dropped.release()

    def _buffers(self, header: Header) -> list[torch.Tensor]:
        """Released buffers of the same layout when there are some (fresh ones cost ~0.5 s
        per GB to allocate and first touch), else new ones."""
        layout = [(b.numel, b.dtype) for b in header.buckets]
        for i, buffers in enumerate(self.pool):
            if [(t.numel(), t.dtype) for t in buffers] == layout:
                return self.pool.pop(i)
        return [torch.empty(n, dtype=d, device=self.device) for n, d in layout]

    def waiting(self) -> bool:
        """Whether a complete publication waits to be taken."""
        return self._latest is not None

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
