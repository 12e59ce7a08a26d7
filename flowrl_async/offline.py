"""Training on a stored run: the groups another run's replay service acknowledged are read
from its log and inserted into this run's replay service before the learner starts, so a
learner trains on them with no actors at all (``cluster.num_actors=0``; with actors running
too, the preloaded groups would count against their admission).

    flowrl-async train replay.preload=runs/OLD/replay cluster.num_actors=0 algo=flowrl_tb \
        replay.selector=uniform replay.max_times_sampled=4 replay.max_staleness=null

Invariants: the stored log is only read, never written; groups keep their ids, so preloading
again (a resumed run) inserts nothing twice; damaged records are skipped, as the reader does.
The new learner's versions continue after the newest stored version, so every stored group
is older than anything this learner produced (staleness >= 1, no row counts as fresh).
"""

from __future__ import annotations

from itertools import islice

from flowrl_async.replay.client import ReplayClient
from flowrl_async.replay.reader import stored_groups


def preload(stored: str, address: str, chunk: int = 256, keys: dict | None = None) -> dict:
    """Insert every group stored under ``stored`` into the service at ``address`` (``keys``:
    ReplayClient's CURVE arguments). -> {"groups": read, "new": inserted now (not already
    there), "max_version": newest}."""
    client = ReplayClient(address, **(keys or {}))
    read = new = 0
    max_version = -1
    try:
        groups = stored_groups(stored)
        while batch := [g for g, _, _ in islice(groups, chunk)]:
            read += len(batch)
            new += sum(client.insert_many(batch))
            max_version = max(max_version, *(r.last_version for g in batch for r in g.responses))
    finally:
        client.close()
    if read == 0:
        raise ValueError(f"replay.preload={stored}: the log holds no readable groups")
    return {"groups": read, "new": new, "max_version": max_version}
