"""Training on a stored run (replay.preload): a fresh learner, no actors, trains on the groups
a previous run's replay service acknowledged, read from its log (which is never written)."""

import hashlib

import pytest

from helpers import small_config


def digest(directory) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


@pytest.mark.integration
def test_a_fresh_learner_trains_on_a_stored_run(tmp_path):
    from flowrl_async.learner.config import AlgoConfig
    from flowrl_async.replay.reader import stored_groups
    from flowrl_async.run.launch import train
    from flowrl_async.run.progress import read_metrics

    first = small_config(tmp_path / "first", steps=4, max_staleness=1)
    first.generator.engine = "torch"
    train(first)
    stored_dir = tmp_path / "first" / "run" / "replay"
    stored = {g.group_id: g for g, _, _ in stored_groups(stored_dir)}
    newest = max(r.last_version for g in stored.values() for r in g.responses)
    before = digest(stored_dir)

    cfg = small_config(tmp_path / "offline", steps=3, max_staleness=None)
    cfg.replay.preload, cfg.cluster.num_actors = str(stored_dir), 0
    cfg.algo = AlgoConfig(name="flowrl", beta=3.0, reward_norm="raw", is_mode="off")
    cfg.replay.selector, cfg.replay.max_times_sampled = "uniform", 3
    summary = train(cfg)
    assert summary["replay"]["inserted"] == len(stored)
    rows = read_metrics(tmp_path / "offline" / "run" / "metrics.jsonl")
    # versions continue after the newest stored one: every stored group is older
    assert [r["version"] for r in rows] == [newest + 2, newest + 3, newest + 4]
    assert all(r["staleness_mean"] >= 1 and r["fresh_rows"] == 0 for r in rows)
    trained = {g.group_id: n for g, _, n in stored_groups(tmp_path / "offline" / "run" / "replay")}
    assert set(trained) == set(stored)  # nothing but the stored groups
    assert sum(trained.values()) == 3 * 4  # 3 steps of 4 groups
    assert digest(stored_dir) == before  # the stored run is only read

    # resuming preloads again: every stored group is a duplicate, nothing is inserted twice
    cfg.resume, cfg.learner.steps = True, 5
    summary = train(cfg)
    assert summary["replay"]["inserted"] == len(stored)
    assert summary["replay"]["duplicates"] == len(stored)
    rows = read_metrics(tmp_path / "offline" / "run" / "metrics.jsonl")
    assert [r["version"] for r in rows][-2:] == [newest + 5, newest + 6]


def test_offline_needs_a_preload():
    from flowrl_async.config import TrainConfig, validate

    cfg = TrainConfig()
    cfg.cluster.num_actors = 0
    with pytest.raises(ValueError, match="0 only with replay.preload"):
        validate(cfg)
    cfg.replay.preload, cfg.cluster.num_actors = "runs/x/replay", 2  # default staleness 1
    with pytest.raises(ValueError) as err:
        validate(cfg)
    assert "replay.preload needs cluster.num_actors=0" in str(err.value)
    assert "replay.preload needs replay.max_staleness=null" in str(err.value)
