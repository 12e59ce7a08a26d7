"""The components wired in one process without Ray (flowrl_async.inline): the replay service
on a thread, learner and two torch-sampler actors as objects, weights over a gloo group
whose members are threads."""

import pytest
from test_train_e2e import accounted_for, small_config


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_inline_run_trains_and_keeps_every_group(tmp_path, mode):
    from flowrl_async.inline import run_inline

    cfg = small_config(tmp_path, steps=5, max_staleness=0)
    cfg.generator.engine, cfg.mode = "torch", mode
    cfg.generator.groups_per_batch = 2  # sync: 2 actors × 2 groups = one batch of 4
    out = run_inline(cfg)
    rows = out["history"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["version"] for r in rows] == [1, 2, 3, 4, 5]
    # staleness 0 (sync forces it too): every trained group came from the learner's
    # current weights, and the actors' recorded log-probs equal the learner's own
    assert all(r["staleness_max"] == 0 for r in rows)
    assert max(r["logprob_gap_fresh"] for r in rows) < 1e-4
    assert out["replay"]["sampled_groups"] == 5 * 4
    assert accounted_for(out["replay"])
    if mode == "sync":  # lock-step: exactly one batch generated per step, nothing left over
        assert out["replay"]["inserted"] == 5 * 4
    assert all(a["weight_loads"] >= 1 for a in out["actors"])
    assert out["learner"]["published"] == 6  # the initial publication + one per step
