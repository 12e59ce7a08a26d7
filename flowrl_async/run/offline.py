"""Training on a stored run: the groups another run's replay service acknowledged are read
from its log and inserted into this run's replay service before the learner starts, so a
learner trains on them with no actors at all (``cluster.num_actors=0``; with actors running
too, the preloaded groups would count against their admission).

    flowrl-async train replay.preload=runs/OLD/replay cluster.num_actors=0 algo=flowrl_tb \
        replay.selector=uniform replay.max_times_sampled=4 replay.max_staleness=null

``replay.preload_min_version`` / ``preload_max_version`` / ``preload_task`` /
``preload_since`` / ``preload_until`` pick a part of the stored run (``reader.GroupFilter``).

Invariants: the stored log is only read, never written; groups keep their ids, so preloading
again (a resumed run) inserts nothing twice; damaged records are skipped, as the reader does.
The new learner's versions continue after the newest stored version, so every stored group
is older than anything this learner produced (staleness >= 1, no row counts as fresh).
"""

from __future__ import annotations

from flowrl_async.replay.reader import GroupFilter, insert_into


def preload(
    stored: str,
    address: str,
    chunk: int = 256,
    keys: dict | None = None,
    where: GroupFilter | None = None,
) -> dict:
    """Insert every group stored under ``stored`` that ``where`` keeps into the service at
    ``address`` (``keys``: ReplayClient's CURVE arguments). -> {"groups": read, "new":
    inserted now (not already there), "max_version": newest}."""
    done = insert_into(stored, address, where, chunk, keys)
    if done["groups"] == 0:
        raise ValueError(f"replay.preload={stored}: the log holds no readable groups{_kept(where)}")
    return done


def _kept(where: GroupFilter | None) -> str:
    return "" if where is None or not where.narrows else f" that {where} keeps"
