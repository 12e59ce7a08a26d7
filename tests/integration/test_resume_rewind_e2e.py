"""A learner that dies after its checkpoint loses the updates since; on resume the replay
service is rewound to the replay checkpoint taken with the learner's, so the groups those
lost updates used are trained again (a real run: Ray, replay service, learner, actors)."""

import msgpack
import pytest

from flowrl_async.replay.log import SegmentLog

from helpers import accounted_for, sigkill_at, small_config


@pytest.mark.integration
def test_a_resumed_run_trains_again_on_the_groups_of_its_lost_updates(tmp_path):
    from flowrl_async.run.launch import train

    cfg = small_config(tmp_path, steps=6, max_staleness=1)
    cfg.generator.engine = "torch"
    cfg.learner.checkpoint_every = 3
    with pytest.raises(RuntimeError, match="the learner process died"):
        train(cfg, on_step=sigkill_at(4, lambda procs: procs.learner))  # step 4: lost
    cfg.resume = True
    summary = train(cfg)
    assert summary["learner"]["step"] == 6

    log = [
        (position, msgpack.unpackb(payload, raw=False))
        for position, payload in SegmentLog(tmp_path / "run" / "replay").read_from(truncate=False)
    ]
    (rwd,) = [(p, r) for p, r in log if r["k"] == "rwd"]
    assert "step-00000003" in rwd[1]["c"]  # the replay checkpoint of the learner's step 3
    covered = (rwd[1]["s"], rwd[1]["o"])

    def sampled(records):
        return [r["ids"] for _, r in records if r["k"] == "smp"]

    kept = sampled(p_r for p_r in log if p_r[0] < covered)  # steps 1-3
    lost = sampled(p_r for p_r in log if covered <= p_r[0] < rwd[0])  # step 4, lost
    again = sampled(p_r for p_r in log if p_r[0] > rwd[0])  # steps 4-6 of the resumed run
    assert (len(kept), len(lost), len(again)) == (3, 1, 3)
    # FIFO: the groups of the lost update are the oldest held again, so they come first
    assert again[0] == lost[0]
    # counted as the learner saw it: every group trained once in the kept history
    trained = [gid for ids in kept + again for gid in ids]
    assert len(trained) == len(set(trained)) == 6 * 4
    replay = summary["replay"]
    assert replay["sampled_groups"] == 6 * 4 and accounted_for(replay)
