"""ReplayService: the replay server running on a thread of its own (what the orchestrator
wraps as a Ray actor; the same class as ``python -m flowrl_async.replay.server``)."""

from __future__ import annotations

import os
import sys
import threading
import time

from flowrl_async.replay.client import ReplayClient
from flowrl_async.replay.server import ReplayServer, ServerConfig


class ReplayService:
    """The replay server on a thread of its own (what Ray runs as an actor)."""

    def __init__(self, cfg: ServerConfig):
        self.server = ReplayServer(cfg)
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, name="replay", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while self.server.bound_address is None and time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError("replay server thread died while binding")
            time.sleep(0.01)

    def _serve(self) -> None:
        self.server.serve()
        if not self.stopping and self.server.log.failed is not None and self.exit_on_failure:
            # the log cannot promise durability: end the process, so that Ray restarts the
            # service and it recovers from the disk (clients' retries reconnect)
            print("replay service: log failed, exiting for a restart", file=sys.stderr, flush=True)
            os._exit(70)

    exit_on_failure = True  # tests running the service in their own process turn it off

    def pid(self) -> int:
        return os.getpid()

    def address(self) -> str:
        return self.server.bound_address

    def stats(self) -> dict:
        """The server's figures, read on its serving thread (through a request); once it
        stopped serving, read directly."""
        if not self.thread.is_alive():
            return self.server.stats()
        client = self._client()
        try:
            return client.stats()
        finally:
            client.close()

    def checkpoint(self, tag: str = "") -> dict:
        """A checkpoint taken on the serving thread (through a request, so never mid-update)."""
        client = self._client()
        try:
            return client.checkpoint(tag)
        finally:
            client.close()

    def _client(self) -> ReplayClient:
        curve = self.server.curve  # with CURVE, it talks as the server itself
        if curve is None:
            return ReplayClient(self.address())
        return ReplayClient(
            self.address(),
            curve_server_key=curve.public,
            curve_client_key=(curve.public, curve.secret),
        )

    def stop(self) -> None:
        self.stopping = True
        self.server.stop()
        self.thread.join(10)
