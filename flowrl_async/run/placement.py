"""Where each process of a run goes, and the addresses the processes reach each other at.

Local (``cluster.address`` null): everything on this machine, loopback addresses only, no
placement group.

Cluster (``cluster.address`` set):
- one placement group reserves, all or nothing, a bundle per learner rank (with a GPU each
  when the learner runs on CUDA) and one bundle per actor (``cluster.actor_gpus`` GPUs each), with
  ``cluster.placement`` strategy (SPREAD by default: actors over the nodes);
- the replay service runs on the driver's node (its log lives in the run directory there) and
  binds that node's IP at a port that is free there;
- the weight group's TCPStore is hosted by the learner (rank 0) on its node's IP, at a port
  the learner finds free on its own node.

Invariants: a restarted actor returns to its own bundle; no address is ever a loopback
address in cluster mode, and always is in local mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flowrl_async.net import node_ip


@dataclass
class Placement:
    """Where each role runs: Ray options per role and the addresses to bind."""

    loopback: bool
    replay_host: str
    replay: dict = field(default_factory=dict)  # Ray .options() of each role
    learners: list[dict] = field(default_factory=lambda: [{}])  # one per learner rank
    actors: list[dict] = field(default_factory=list)
    group: object | None = None  # the placement group, removed at shutdown


def plan(ray, cluster, learner_threads: int, learner_gpu: bool, timeout_s: float = 120.0,
         learner_ranks: int = 1):  # fmt: skip
    """-> Placement for ``cluster`` (a ClusterSection); raises if the cluster cannot hold it."""
    n = cluster.num_actors
    if not cluster.address:
        return Placement(True, "127.0.0.1", learners=[{} for _ in range(learner_ranks)],
                         actors=[{} for _ in range(n)])  # fmt: skip
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import (
        NodeAffinitySchedulingStrategy,
        PlacementGroupSchedulingStrategy,
    )

    learner_bundle = {"CPU": learner_threads, **({"GPU": 1} if learner_gpu else {})}
    actor_bundle = {"CPU": cluster.actor_threads}
    if cluster.actor_gpus:
        actor_bundle["GPU"] = cluster.actor_gpus
    bundles = [dict(learner_bundle) for _ in range(learner_ranks)]
    bundles += [dict(actor_bundle) for _ in range(n)]
    group = placement_group(bundles, strategy=cluster.placement)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(group)
        raise RuntimeError(
            f"the Ray cluster at {cluster.address} could not reserve {bundles} "
            f"(strategy {cluster.placement}) within {timeout_s:.0f} s; it has "
            f"{ray.cluster_resources()}: add nodes, or lower cluster.num_actors / "
            "cluster.actor_gpus / learner.threads"
        )

    def in_bundle(i: int) -> dict:
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, i)}

    here = ray.get_runtime_context().get_node_id()
    return Placement(
        loopback=False,
        replay_host=node_ip(),
        replay={"scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)},
        learners=[in_bundle(r) for r in range(learner_ranks)],
        actors=[in_bundle(learner_ranks + i) for i in range(n)],
        group=group,
    )


def cluster_has_gpu(ray) -> bool:
    return ray.cluster_resources().get("GPU", 0) >= 1
