"""The simulator: hand-worked throughput in the three regimes, and replay decisions equal to
the real service's for the same events."""

import random

import pytest

from flowrl_async.config import TrainConfig
from flowrl_async.replay.server import ReplayServer, ServerConfig
from flowrl_async.run.sim.costs import Costs
from flowrl_async.run.sim.model import Replay, SimGroup
from flowrl_async.run.sim.run import simulate

from factories import make_group


def config(tmp_path, **overrides) -> TrainConfig:
    cfg = TrainConfig(run_dir=str(tmp_path / "run"))
    cfg.learner.steps = 200
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def test_sync_steps_per_second_is_one_over_generate_train_publish(tmp_path):
    # 1 actor, a batch of 2 prompts x n 2, every response 5 tokens:
    #   generate = 5 steps of (0.01 + 0.001 * 4 running) + verify 2 x 0.002 = 0.074 s
    #              (+ load 0.01 from the second step on: the weights of the step before)
    #   train    = 0.05 + 0.001 * 20 tokens = 0.07 s;  publish = 0.03 s
    cfg = config(tmp_path, generator__n=2, generator__groups_per_batch=2,
                 learner__batch_groups=2, cluster__num_actors=1)  # fmt: skip
    cfg.mode = "sync"
    costs = Costs(step_s=0.01, step_per_seq_s=0.001, verify_s=0.002, load_s=0.01,
                  train_base_s=0.05, train_per_token_s=0.001, publish_base_s=0.03,
                  lengths=[[5, 1.0]])  # fmt: skip
    out, s = simulate(cfg, costs, steps=100)
    assert out.time_s == pytest.approx(100 * (0.074 + 0.07 + 0.03) + 99 * 0.01, rel=1e-9)
    assert s["staleness_hist"] == {0: 200} and s["evicted_stale"] == 0


def test_generation_bound_async_runs_at_the_actors_rate(tmp_path):
    # 2 actors x 2 prompts in flight x n 2, responses of 10 tokens: each actor ends 2 groups
    # every 10 x (0.01 + 0.001 x 4) + 2 x 0.002 = 0.144 s; the learner (1 ms a step) takes 4
    # a step: 4 / 0.144 groups/s / 4 = 6.944 steps/s
    cfg = config(tmp_path, generator__n=2, generator__max_in_flight=2, learner__batch_groups=4,
                 replay__max_staleness=8)  # fmt: skip
    costs = Costs(step_s=0.01, step_per_seq_s=0.001, verify_s=0.002, load_s=0.0,
                  train_base_s=0.001, train_per_token_s=0.0, lengths=[[10, 1.0]])  # fmt: skip
    _, s = simulate(cfg, costs)
    assert s["steps_per_s"] == pytest.approx(1 / 0.144, rel=0.02)
    assert s["learner_idle"] > 0.9 and s["actor_idle"] < 0.05


def test_learner_bound_async_runs_at_the_learners_rate(tmp_path):
    # actors nearly free; a step trains 0.1 s and publishes 0.02 s: 1 / 0.12 steps/s, and
    # admission keeps them at most the staleness bound ahead
    cfg = config(tmp_path, replay__max_staleness=2)
    costs = Costs(step_s=1e-5, train_base_s=0.1, train_per_token_s=0.0, publish_base_s=0.02,
                  load_s=0.0)  # fmt: skip
    _, s = simulate(cfg, costs)
    assert s["steps_per_s"] == pytest.approx(1 / 0.12, rel=0.02)
    assert s["learner_idle"] < 0.02 and max(s["staleness_hist"]) <= 2


@pytest.mark.parametrize(
    "settings",
    [
        dict(selector="fifo", max_staleness=1),
        dict(selector="uniform", max_staleness=2, max_times_sampled=2),
        dict(selector="prioritized", max_staleness=None, max_times_sampled=3),
        dict(selector="mixed", max_staleness=None, max_times_sampled=4, fresh_fraction=0.5),
        dict(selector="uniform", max_staleness=3, samples_per_insert=1.0, min_size_to_sample=4),
        dict(
            selector="mixed",
            max_staleness=None,
            max_times_sampled=4,
            fresh_fraction=1.0,
            samples_per_insert=2.0,
            min_size_to_sample=3,
        ),  # starved: too few fresh groups
    ],
    ids=lambda s: s["selector"] + ("+limiter" if "samples_per_insert" in s else ""),
)
def test_the_simulated_replay_decides_as_the_real_service(tmp_path, settings):
    """The same random sequence of admissions, inserts, samples and versions through the
    real server's request handlers and through the simulator's replay: the same positions
    granted, inserts held, groups sampled (same seed) with the same staleness."""
    cfg = ServerConfig(str(tmp_path / "r"), groups_per_version=4, seed=3, fsync="never",
                       **settings)  # fmt: skip
    server, sim = ReplayServer(cfg), Replay(cfg)
    rng, versions, made, held = random.Random(0), {1: 0, 2: 0}, 0, 0
    for step in range(400):
        what = rng.choice(["admit", "insert", "insert", "sample", "version"])
        actor = rng.choice([1, 2])
        if what == "admit":
            k, weights = rng.randint(1, 5), versions[actor]
            _, reply = server.handle("admit", {"actor": actor, "k": k, "weights": weights})
            assert sim.admit(actor, k, weights) == reply["positions"]
        elif what == "insert" and server.state.outstanding.get(actor):
            cursor = min(server.state.outstanding[actor])
            gid, made = f"p-{made}", made + 1
            rewards = [rng.choice([0.0, 1.0]) for _ in range(2)]
            g = make_group(gid, n=2, version=versions[actor], actor_id=actor, cursor=cursor,
                           rewards=rewards)  # fmt: skip
            reply = server.handle("insert", {"group": group_wire(g), "rid": step})
            if reply is None:  # held by the rate limiter: the simulator holds it too
                held += 1
                assert not sim.may_insert()
                server.held.inserts.clear()  # the actor gives up; nothing was accepted
                server.state.outstanding[actor].discard(cursor)
                sim.state.outstanding[actor].discard(cursor)
                continue
            assert sim.may_insert()
            sim.insert(actor, SimGroup(gid, cursor, versions[actor], [3, 3]), 0.0,
                       spread=max(rewards) - min(rewards))  # fmt: skip
        elif what == "sample":
            version = max(versions.values())
            reply = server.handle(
                "sample", {"batch_size": 3, "version": version, "req": f"q{step}"}
            )
            got = sim.sample(3, version)
            if reply is None:  # held: the server's next turn tries it again (and so learns
                server._serve_held_samples()  # whether the limiter or the groups stopped it)
                server.held.samples.clear()  # the learner asks anew below
                assert got is None
            else:
                assert [(gid, row[1]) for gid, row in zip(ids_of(reply), reply[1]["info"],
                                                          strict=True)] == got  # fmt: skip
        elif what == "version":
            versions[actor] += 1
            server.handle("version", {"version": max(versions.values())})
            sim.set_version(max(versions.values()))
        assert same_state(server, sim), (step, what)
    counters = server.buffer.counters
    assert counters == sim.state.buffer.counters and counters.sampled_groups > 0
    assert counters.inserted > 20
    if "samples_per_insert" in settings:
        assert held > 0  # the limiter's holds were exercised


def group_wire(g):
    from flowrl_async.wire import group_to_wire

    return group_to_wire(g)


def ids_of(reply):
    import msgpack

    return [msgpack.unpackb(b, raw=False)["id"] for b in reply[1]["groups"]]


def same_state(server, sim) -> bool:
    a, b = server.state, sim.state
    return (list(a.buffer.entries) == list(b.buffer.entries) and a.cursor == b.cursor
            and a.outstanding == b.outstanding and a.redo == b.redo
            and a.buffer.counters == b.buffer.counters and server.starved == sim.starved
            and [e.times_sampled for e in a.buffer.entries.values()]
            == [e.times_sampled for e in b.buffer.entries.values()])  # fmt: skip


def test_calibrate_fits_a_runs_figures(tmp_path):
    import json

    from flowrl_async.run.sim.calibrate import calibrate

    from helpers import served_replay

    run = tmp_path / "run"
    run.mkdir()
    # actor 1: 10 steps with 2 sequences running (0.014 s each) and 10 with 4 (0.018 s):
    # n 20, Σk 60, Σk² 200, Σt 0.32, Σk·t 1.0 -> b = (1.0 − 60·0.32/20)/(200 − 60²/20) =
    # 0.04/20 = 0.002, a = (0.32 − 0.002·60)/20 = 0.01; actor 2 ran no step
    sums = dict(step_n=20, step_k=60, step_kk=200, step_t=0.32, step_kt=1.0)
    actors = [dict(groups=10, verify_s=0.1, push_s=0.05, load_s=0.3, weight_loads=2, **sums),
              dict(groups=10, verify_s=0.1, push_s=0.15, load_s=0.1, weight_loads=2,
                   step_n=0, step_k=0, step_kk=0, step_t=0.0, step_kt=0.0)]  # fmt: skip
    (run / "summary.json").write_text(json.dumps({"actors": actors}))
    rows = [dict(step=1, step_s=1.0, wait_s=0.2, publish_s=0.1, tokens=70.0),
            dict(step=2, step_s=2.0, wait_s=0.5, publish_s=0.3, tokens=130.0)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with served_replay(run / "replay", max_staleness=None) as client:
        client.insert_many([make_group("a", n=2, tokens=3), make_group("b", n=2, tokens=5)])
    costs = calibrate(run)
    assert costs.step_s == pytest.approx(0.01) and costs.step_per_seq_s == pytest.approx(0.002)
    assert costs.verify_s == pytest.approx(0.4 / 20)  # (verify + push) per group
    assert costs.load_s == pytest.approx(0.4 / 4)
    # (1.0 − 0.2 − 0.1) + (2.0 − 0.5 − 0.3) = 1.9 s over 200 tokens; publish mean 0.2 s
    assert costs.train_per_token_s == pytest.approx(1.9 / 200)
    assert costs.publish_s == pytest.approx(0.2)
    assert costs.lengths == [[3, 2], [5, 2]] and costs.prompt_tokens == 3


def test_the_simulate_command_writes_a_run_that_summarize_reads(tmp_path):
    import json
    import subprocess
    import sys

    from flowrl_async.run.sim.costs import save_costs

    costs = save_costs(Costs(step_s=0.002, train_per_token_s=1e-4, lengths=[[4, 1], [16, 1]]),
                       tmp_path / "costs.json")  # fmt: skip
    sweep = tmp_path / "sims"
    out = subprocess.run(
        [sys.executable, "-m", "flowrl_async", "simulate", "-m", f"sim.costs={costs}",
         "learner.steps=30", "replay.max_staleness=0,2", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out.count("learner steps/s") == 2
    for job in ("0", "1"):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["steps"] == 30 and summary["steps_per_s"] > 0
        assert (sweep / job / "sim.png").stat().st_size > 1000
    assert json.loads((sweep / "0" / "summary.json").read_text())["staleness_hist"] == {
        "0": 30 * 8
    }  # 8 groups a step
    table = subprocess.run([sys.executable, "-m", "flowrl_async", "summarize", str(sweep)],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "replay.max_staleness=0" in table and "replay.max_staleness=2" in table
