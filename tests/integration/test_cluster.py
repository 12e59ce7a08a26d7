"""Cluster mode on one machine: a Ray cluster of two nodes started locally, the main job
joining it through ``cluster.address``. The placement group spreads learner and actors over
the nodes, and every address the processes use is the node IP, not loopback."""

import pytest

from helpers import accounted_for, small_config


@pytest.fixture
def two_node_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


@pytest.mark.integration
def test_main_job_joins_a_two_node_cluster(tmp_path, two_node_cluster):
    import ray

    from flowrl_async.run.launch import train

    cfg = small_config(tmp_path, steps=6, max_staleness=1)
    cfg.generator.engine = "torch"
    cfg.cluster.address = two_node_cluster.address
    cfg.replay.insecure = True  # plain TCP on the node's IP, knowingly (CURVE: test_replay_curve)
    seen = {}

    def inspect(step, procs):
        if step == 1:
            table = ray.util.placement_group_table(procs.placement.group)
            seen["bundle_nodes"] = table["bundles_to_node_id"]
            seen["replay"] = ray.get(procs.replay.address.remote())
            seen["weights"] = procs.weight_endpoint  # the group the run really formed

    summary = train(cfg, on_step=inspect)
    assert summary["steps"] == 6
    assert accounted_for(summary["replay"])
    # learner bundle + 2 actor bundles (1 CPU each) on nodes of 1 and 2 CPUs: both are used
    assert len(seen["bundle_nodes"]) == 3
    assert len(set(seen["bundle_nodes"].values())) == 2
    # both nodes run on this machine, so the replay service and the weight group's store
    # share its IP: a routable one, never loopback
    replay_host = seen["replay"].removeprefix("tcp://").rsplit(":", 1)[0]
    assert replay_host == seen["weights"][0]
    assert not replay_host.startswith("127.")


def test_validation_names_bad_cluster_fields():
    from flowrl_async.config import TrainConfig, validate

    cfg = TrainConfig()
    cfg.cluster.placement, cfg.cluster.actor_gpus = "SIDEWAYS", -1
    with pytest.raises(ValueError) as err:
        validate(cfg)
    assert "cluster.placement='SIDEWAYS'" in str(err.value)
    assert "cluster.actor_gpus must be >= 0" in str(err.value)
