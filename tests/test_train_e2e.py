"""The main job end to end on the real thing: Ray, the replay service, a learner and two
vLLM actors, weights over gloo, on the built-in task (a short run)."""

import json

import pytest

from flowrl_async.config import TrainConfig, validate


@pytest.mark.integration
def test_short_training_run(tmp_path):
    cfg = TrainConfig(run_dir=str(tmp_path / "run"))
    cfg.learner.steps = 12
    cfg.learner.checkpoint_every = 5
    cfg.learner.batch_groups = 4
    cfg.model.warm_start_steps = 20
    cfg.task.kwargs = {"lengths": [2], "min_solutions": 5, "partial_credit": 0.5}
    from flowrl_async.launch import train

    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["version"] for r in rows] == list(range(1, 13))  # one publication per step
    assert all(r["staleness_max"] <= 1 for r in rows)  # the bound held
    # behaviour log-probs of groups made with the learner's current weights match its own
    fresh = [r["logprob_gap_fresh"] for r in rows if r["fresh_rows"] > 0]
    assert fresh and max(fresh) < 1e-4, fresh
    actors = summary["actors"]
    assert len(actors) == 2 and all(a["weight_loads"] >= 1 for a in actors)
    replay = summary["replay"]
    # every acknowledged group is either still buffered, trained, or evicted as stale
    assert replay["inserted"] == (
        replay["size"]
        + replay["evicted_used"]
        + replay["evicted_stale"]
        + replay["evicted_capacity"]
    )
    assert replay["sampled_groups"] == 12 * 4
    assert (tmp_path / "run" / "final_policy" / "model.safetensors").exists()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-00000005", "step-00000010", "step-00000012"]

    # resume: the run continues from step 12 at version 12 up to 15
    cfg.resume = True
    cfg.learner.steps = 15
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == list(range(1, 16))
    assert [r["version"] for r in rows[12:]] == [13, 14, 15]
    # actors got the resumed weights before generating: the gap stays tiny after resume
    fresh = [r["logprob_gap_fresh"] for r in rows[12:] if r["fresh_rows"] > 0]
    assert fresh and max(fresh) < 1e-4, fresh


def test_bad_combinations_are_rejected_with_the_field_names():
    cfg = TrainConfig()
    cfg.replay.max_staleness = None
    cfg.algo.is_mode = "clip"
    cfg.replay.selector = "fifo"
    cfg.replay.max_times_sampled = 2
    cfg.generator.engine = "sglang"
    with pytest.raises(ValueError) as e:
        validate(cfg)
    msg = str(e.value)
    assert "replay.max_staleness=null" in msg and "algo.is_mode=none" in msg
    assert "max_times_sampled=1" in msg and "generator.engine='sglang'" in msg
