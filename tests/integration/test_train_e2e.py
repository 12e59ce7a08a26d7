"""The main job end to end on the real thing: Ray, the replay service, a learner and two
vLLM actors, weights over gloo, on the built-in task (a short run)."""

import json

import pytest

from flowrl_async.config import TrainConfig, validate

from helpers import accounted_for, sigkill_at, small_config


@pytest.mark.integration
def test_short_training_run(tmp_path):
    # staleness 0: every trained group comes from the learner's current weights, so the
    # actor-vs-learner log-prob gap is measured on every row
    cfg = small_config(tmp_path, steps=12, max_staleness=0)
    cfg.learner.checkpoint_every = 5
    cfg.evaluation.every, cfg.evaluation.samples = 6, 4  # periodic held-out evaluation
    cfg.replay.metrics_every = 5  # the service's figures in metrics.jsonl
    from flowrl_async.run.launch import train

    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["version"] for r in rows] == list(range(1, 13))  # one publication per step
    evaluated = [r["step"] for r in rows if "eval_accuracy" in r]
    assert evaluated == [6, 12]
    assert [r["step"] for r in rows if "replay_size" in r] == [5, 10]
    assert rows[9]["replay_sampled_groups"] == 10 * 4  # as the service counted at step 10
    assert rows[9]["replay_sampled_staleness_0"] == 10 * 4  # staleness bound 0
    assert rows[9]["replay_inserts_per_s"] > 0
    for r in rows:
        if "eval_accuracy" in r:
            assert 0.0 <= r["eval_accuracy"] <= r["eval_pass@4"] <= 1.0
            assert r["eval_version"] >= r["version"] - 2  # the actor's weights are recent
    assert all(r["staleness_max"] == 0 and r["fresh_rows"] == 1 for r in rows)  # bound held
    # behaviour log-probs recorded by vLLM match the learner's own for the same weights
    assert max(r["logprob_gap_fresh"] for r in rows) < 1e-4
    actors = summary["actors"]
    assert len(actors) == 2 and all(a["weight_loads"] >= 1 for a in actors)
    replay = summary["replay"]
    assert accounted_for(replay)
    assert replay["sampled_groups"] == 12 * 4
    assert (tmp_path / "run" / "final_policy" / "model.safetensors").exists()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-00000005", "step-00000010", "step-00000012"]
    # the replay service took its checkpoint at the same point as the learner's
    extra = json.loads(
        (tmp_path / "run" / "checkpoints" / "step-00000010" / "extra.json").read_text()
    )
    from pathlib import Path

    assert Path(extra["replay_checkpoint"]["path"]).exists()
    assert "step-00000010" in Path(extra["replay_checkpoint"]["path"]).read_bytes().decode(
        "latin-1"
    )

    # the service keeps as many checkpoints as the learner, the ones the learner's refer to
    def replay_checkpoints_match():
        refs = sorted(
            Path(json.loads((p / "extra.json").read_text())["replay_checkpoint"]["path"]).name
            for p in (tmp_path / "run" / "checkpoints").iterdir()
        )
        kept = sorted(p.name for p in (tmp_path / "run" / "replay" / "checkpoints").iterdir())
        return len(refs) == 3 and kept == refs

    assert replay_checkpoints_match()

    # resume: the run continues from step 12 at version 12 up to 15
    cfg.resume = True
    cfg.learner.steps = 15
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == list(range(1, 16))
    assert [r["version"] for r in rows[12:]] == [13, 14, 15]
    # actors got the resumed weights before generating: the gap stays tiny after resume
    assert all(r["fresh_rows"] == 1 for r in rows[12:])
    assert max(r["logprob_gap_fresh"] for r in rows[12:]) < 1e-4
    assert replay_checkpoints_match()  # 10, 12, 15


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
    assert "replay.max_staleness=null" in msg and "algo.is_mode=off" in msg
    assert "max_times_sampled=1" in msg and "generator.engine='sglang'" in msg


@pytest.mark.integration
def test_an_actor_killed_mid_stream_is_restarted_and_its_prompts_go_out_again(tmp_path):
    from flowrl_async.replay.reader import stored_groups
    from flowrl_async.run.launch import train

    # streaming actors with in-flight loads (the default), staleness 2 so groups spanning a
    # load are trained; SIGKILL one actor while it has prompts in flight
    cfg = small_config(tmp_path, steps=40, max_staleness=2)
    cfg.generator.engine = "torch"  # the restart is the subject (vLLM actors: the short run)
    cfg.generator.max_in_flight, cfg.generator.max_tokens = 4, 24
    cfg.model.warm_start_steps = 0  # long random answers: loads land mid-response
    cfg.replay.retain = "all"  # every group stays in the log, for the check below
    summary = train(cfg, on_step=sigkill_mid_stream(3))
    assert summary["actor_restarts"] == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    restarted = summary["actors"][0]
    # the new process loaded weights after it rejoined, and generated with them
    assert restarted["weight_loads"] >= 1 and restarted["groups"] >= 1
    assert restarted["version"] > 3 and restarted["engine_steps"] > 0
    replay = summary["replay"]
    # nothing acknowledged was lost, nothing was trained twice (FIFO hands each group out once)
    assert accounted_for(replay)
    assert replay["sampled_groups"] == 40 * 4
    groups = [g for g, _, _ in stored_groups(tmp_path / "run" / "replay")]
    # whole groups only, each prompt position once: nothing half-generated or doubled
    assert groups and all(len(g.responses) == cfg.generator.n for g in groups)
    cursors = [g.cursor for g in groups]
    assert len(cursors) == len(set(cursors)) == replay["inserted"]
    # the killed actor's prompts in flight (its positions outstanding when its restart
    # released them) were handed out again: each is in the log, or out at the very end
    released, out = released_positions(tmp_path / "run" / "replay")
    assert released, "the actor was killed with no prompt in flight"
    assert released <= set(cursors) | out
    # responses that spanned a load (how many depends on timing: 0 to ~90 seen) record it
    spanning = [r for g in groups for r in g.responses if r.switches]
    assert all(r.token_versions()[-1] == r.last_version > r.first_version for r in spanning)
    assert max(r["logprob_gap_fresh"] for r in rows) < 1e-4


@pytest.mark.integration
def test_the_replay_service_killed_mid_run_recovers_from_its_log(tmp_path):
    from flowrl_async.run.launch import train

    cfg = small_config(tmp_path, steps=20, max_staleness=1)
    cfg.generator.engine = "torch"  # the replay service is the subject (vLLM: above)
    summary = train(cfg, on_step=sigkill_at(4, lambda procs: procs.replay))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    replay = summary["replay"]
    assert replay["recovered_records"] > 0  # the restarted service rebuilt its state
    # every acknowledged group (before and after the crash) is accounted for
    assert accounted_for(replay)
    assert replay["duplicates"] >= 0 and replay["sampled_groups"] >= 20 * 4


@pytest.mark.integration
def test_off_policy_trajectory_balance_mixes_fresh_and_replayed_groups(tmp_path):
    from collections import Counter

    import msgpack

    from flowrl_async.learner.config import AlgoConfig
    from flowrl_async.replay.log import SegmentLog
    from flowrl_async.run.launch import train

    cfg = small_config(tmp_path, steps=12, max_staleness=None)
    cfg.algo = AlgoConfig(name="flowrl", beta=3.0, reward_norm="raw", is_mode="off")
    cfg.replay.selector, cfg.replay.max_times_sampled, cfg.replay.fresh_fraction = "mixed", 3, 0.5
    cfg.generator.engine = "torch"  # the selector is the subject
    cfg.generator.streaming = True  # and the actors stream (off-policy: any staleness)
    summary = train(cfg)
    assert summary["replay"]["sampled_groups"] == 12 * 4
    times = Counter()
    for payload in SegmentLog(tmp_path / "run" / "replay").read_all():
        record = msgpack.unpackb(payload, raw=False)
        if record["k"] == "smp":
            times.update(record["ids"])
    # batches of 4 = 2 fresh + 2 replayed (once anything was trained): some groups are
    # trained more than once, none more than max_times_sampled = 3
    assert max(times.values()) <= 3 and any(n > 1 for n in times.values()), times
    # fresh groups are trained once each at least: 12 steps × 2 fresh ≥ 24 distinct groups
    assert len(times) >= 24


@pytest.mark.integration
def test_a_learner_crash_stops_the_run_clearly_and_resume_continues(tmp_path):
    from flowrl_async.run.launch import train

    cfg = small_config(tmp_path, steps=9, max_staleness=1)
    cfg.generator.engine = "torch"
    cfg.learner.checkpoint_every = 3
    with pytest.raises(RuntimeError) as err:
        train(cfg, on_step=sigkill_at(4, lambda procs: procs.learner))
    message = str(err.value)
    assert "the learner process died" in message
    assert "step-00000003" in message and "resume=true" in message
    cfg.resume = True
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    # steps 1-4 ran before the crash (4 was not checkpointed); the resumed run redoes 4-9
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4, 5, 6, 7, 8, 9]
    assert [r["version"] for r in rows][-6:] == [4, 5, 6, 7, 8, 9]
    assert summary["learner"]["step"] == 9


@pytest.mark.integration
def test_a_run_whose_actor_dies_after_the_last_step_still_leaves_its_results(tmp_path):
    # the actor's process is killed after the last step (as Ray's memory monitor did to a
    # 0.5B-model run): the final policy, summary.json and curves are written anyway, and
    # the summary says why that actor could not answer (Ray's reason), instead of exit 1
    from flowrl_async.run.launch import train

    cfg = small_config(tmp_path, steps=3, max_staleness=1)
    cfg.generator.engine = "torch"  # the run's ending is the subject
    summary = train(cfg, on_step=sigkill_at(3, lambda procs: procs.actors[0]))
    run = tmp_path / "run"
    assert (run / "final_policy" / "model.safetensors").exists()
    assert (run / "curves.png").exists()
    written = json.loads((run / "summary.json").read_text())
    dead, alive = written["actors"]
    assert dead["actor"] == 1 and "unavailable" in dead, dead
    # Ray's word for it: the actor's loop ended with its death ("ActorDiedError: Worker
    # unexpectedly exits ...") or, when Ray is already restarting it, the call found it
    # unavailable (a memory-monitor kill is named as such: test_actor_health.py)
    assert dead["unavailable"].startswith(("ActorDiedError: ", "ActorUnavailableError: ")), dead
    assert "unavailable" not in alive and alive["weight_loads"] >= 1
    assert summary["steps"] == 3 and summary["replay"]["sampled_groups"] == 3 * 4


@pytest.mark.integration
def test_a_sharded_learner_trains_the_main_job_and_resumes_on_one_rank(tmp_path):
    # learner.world_size=2: two learner processes shard policy and reference with FSDP2 on
    # gloo; rank 0 publishes to the vLLM actors, whose recorded log-probs then match the
    # learner's own; the checkpoint resumes on one rank (resharded) and training goes on
    from flowrl_async.run.launch import train

    cfg = small_config(tmp_path, steps=4, max_staleness=0)
    cfg.learner.world_size, cfg.learner.checkpoint_every = 2, 2
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["version"] for r in rows] == [1, 2, 3, 4]
    assert all(r["fresh_rows"] == 1 for r in rows)  # staleness 0: the learner's own weights
    assert max(r["logprob_gap_fresh"] for r in rows) < 1e-4
    assert all(a["weight_loads"] >= 4 for a in summary["actors"])  # probe passed each time
    assert summary["learner"]["published"] == 5  # the group's first publication + 4
    assert (tmp_path / "run" / "final_policy" / "model.safetensors").exists()
    # on one rank, and in bf16 (fp32 master weights in the checkpoint: any compute dtype)
    cfg.resume, cfg.learner.world_size, cfg.learner.steps = True, 1, 6
    cfg.model.dtype = "bfloat16"
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # bf16 engines vs the learner's bf16 autocast: ~1e-2 a token (measured 0.008-0.013)
    assert all(0 < r["logprob_gap_fresh"] < 3e-2 for r in rows[4:])
    assert all(a["weight_loads"] >= 1 for a in summary["actors"])  # each load probed, in bf16


def sigkill_mid_stream(after: int):
    """An on_step hook that SIGKILLs actor 1 at the first step from ``after`` on at which it
    has prompts in flight. The learner waits (up to 10 s a step, over 5 steps at most) for
    that moment: when the actors run ahead of it they sit idle at every step boundary (CI
    saw 40 such steps), and the step's publish is what lets them start again."""
    import os
    import signal
    import time

    import ray

    killed = []

    def hook(step, procs):
        actor = procs.actors[0]
        deadline = time.monotonic() + 10
        while after <= step < after + 5 and not killed and time.monotonic() < deadline:
            if ray.get(actor.stats.remote())["in_flight"] > 0:
                os.kill(ray.get(actor.pid.remote()), signal.SIGKILL)
                killed.append(step)
            else:
                time.sleep(0.005)

    return hook


def released_positions(replay_dir):
    """(positions restarted actors had outstanding when released, positions outstanding at
    the end), replayed from the service's log records."""
    from flowrl_async.replay.reader import read_log

    outstanding: dict[int, set[int]] = {}
    released: set[int] = set()
    for r in read_log(replay_dir):
        if r["k"] == "adm":
            outstanding.setdefault(r["a"], set()).update(r["p"])
        elif r["k"] == "ins":
            outstanding.get(r["g"]["actor"], set()).discard(r["g"]["cursor"])
        elif r["k"] == "rel":
            released |= outstanding.pop(r["a"], set())
    return released, set().union(*outstanding.values())
