"""flowrl-async summarize over a folder of runs (a sweep), on hand-made metrics."""

import json

from flowrl_async.cli import main


def write_run(path, overrides, rows):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    with open(path / "metrics.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def metrics(step, acc, tokens=100.0, step_s=0.5, wait_s=0.1, stale=1.0):
    return {
        "step": step,
        "reward_mean": acc / 2,
        "accuracy": acc,
        "distinct_correct": 2 * acc,
        "tokens": tokens,
        "step_s": step_s,
        "wait_s": wait_s,
        "staleness_mean": stale,
    }


def test_summarize_table_and_plot(tmp_path, capsys):
    sweep = tmp_path / "multirun"
    # 5 steps each: the last fifth is the last step
    write_run(
        sweep / "0",
        ["replay.max_staleness=0"],
        [metrics(s, 0.1 * s, stale=0.0) for s in range(1, 6)],
    )
    write_run(sweep / "1", ["replay.max_staleness=4"], [metrics(s, 0.05 * s) for s in range(1, 6)])
    main(["summarize", str(sweep)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [
        "run",
        "steps",
        "reward",
        "accuracy",
        "distinct",
        "steps/s",
        "tok/s",
        "staleness",
        "wait",
    ]
    # run 0: accuracy at step 5 = 0.5, reward 0.25, distinct 1.0; steps/s = 5/2.5 = 2;
    # tok/s = 500/2.5 = 200; staleness 0; wait = 0.5/2.5 = 0.2
    assert out[2].split() == [
        "replay.max_staleness=0",
        "5",
        "0.250",
        "0.500",
        "1.000",
        "2.000",
        "200",
        "0.000",
        "0.200",
    ]
    assert out[3].split()[:4] == ["replay.max_staleness=4", "5", "0.125", "0.250"]
    assert (sweep / "summary.png").stat().st_size > 1000


def test_summarize_reads_simulated_runs_which_have_no_rewards(tmp_path, capsys):
    rows = [{k: v for k, v in metrics(s, 0.0).items()
             if k not in ("reward_mean", "accuracy", "distinct_correct")} for s in range(1, 3)]  # fmt: skip
    write_run(tmp_path / "sims" / "0", ["replay.max_staleness=2"], rows)
    main(["summarize", str(tmp_path / "sims")])
    line = capsys.readouterr().out.splitlines()[2].split()
    assert line == ["replay.max_staleness=2", "2", "nan", "nan", "nan", "2.000", "200", "1.000",
                    "0.200"]  # fmt: skip
