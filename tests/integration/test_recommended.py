"""Every configuration the README recommends or benchmarks, end to end through the command
line as users type it (short runs): off-policy TB with replay (long enough for trained
groups to pass staleness 64, where a stats reply once outgrew the decoder's limits), GRPO,
lock-step mode, and training on a stored run whose groups are hundreds of versions old."""

import json
import subprocess
import sys

import pytest

from factories import make_group

CLI = [sys.executable, "-m", "flowrl_async", "train"]
SMALL = ["model.warm_start_steps=5", "task.kwargs.lengths=[2]", "task.kwargs.min_solutions=5"]


def train(run_dir, *overrides: str, timeout_s: float = 420) -> tuple[list[dict], dict]:
    """Run ``flowrl-async train``; -> (metrics rows, summary.json). It must exit 0."""
    cmd = [*CLI, f"run_dir={run_dir}", *SMALL, *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert (run_dir / "final_policy" / "model.safetensors").exists()
    assert (run_dir / "curves.png").exists()
    return rows, json.loads((run_dir / "summary.json").read_text())


def replay_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "replay_size" in r]


@pytest.mark.integration
def test_off_policy_tb_with_replay_trains_past_staleness_64(tmp_path):
    # the README's recommended setting (algo=flowrl_tb replay=mixed) with tiny batches: one
    # fresh and one replayed group per step, replayed groups get older every step
    steps = 160
    rows, summary = train(
        tmp_path / "run", "algo=flowrl_tb", "replay=mixed", f"learner.steps={steps}",
        "learner.batch_groups=2", "generator.groups_per_batch=1", "generator.n=4",
        "cluster.num_actors=1", "replay.metrics_every=4", "learner.checkpoint_every=1000",
    )  # fmt: skip
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert max(r["staleness_max"] for r in rows) > 64
    snapshots = replay_rows(rows)
    assert len(snapshots) == steps // 4 and all(r["replay_stats_errors"] == 0 for r in snapshots)
    last = snapshots[-1]
    assert last["replay_sampled_staleness_64-127"] > 0
    # the histogram counts every group the service handed out
    hist = sum(v for k, v in last.items() if k.startswith("replay_sampled_staleness_"))
    assert hist == last["replay_sampled_groups"] == steps * 2
    assert summary["replay"]["sampled_groups"] == steps * 2
    assert summary["figure_errors"] == {"replay_stats": 0, "eval": 0, "curves": 0}


@pytest.mark.integration
@pytest.mark.parametrize(
    "setting, batch",  # sync: a batch is what both actors make in one round (2 × 4 groups)
    [(["algo=grpo"], 4), (["mode=sync"], 8)], ids=["grpo", "sync"],
)  # fmt: skip
def test_readme_settings_run_end_to_end(tmp_path, setting, batch):
    rows, summary = train(
        tmp_path / "run", *setting, "learner.steps=6", f"learner.batch_groups={batch}",
        "replay.metrics_every=3",
    )  # fmt: skip
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["step"] for r in replay_rows(rows)] == [3, 6]
    assert summary["replay"]["sampled_groups"] == 6 * batch
    assert all("unavailable" not in a for a in summary["actors"])


def stored_run(directory, versions: range, n: int = 4):
    """A replay log as a run's service leaves it: one group per weight version."""
    from flowrl_async.replay.client import ReplayClient
    from flowrl_async.replay.server import ReplayServer, ServerConfig

    from helpers import serve_and_connect

    cfg = ServerConfig(str(directory), "tcp://127.0.0.1:0", max_staleness=None, selector="fifo")
    server = ReplayServer(cfg)
    thread, sock = serve_and_connect(server)
    client = ReplayClient(server.bound_address)
    try:
        groups = [
            make_group(
                f"old{v}",
                n=n,
                tokens=3 + v % 4,
                version=v,
                rewards=[float(i % 2) for i in range(n)],
            )
            for v in versions
        ]
        client.insert_many(groups)
    finally:
        client.close()
        sock.close(0)
        server.stop()
        thread.join(5)


@pytest.mark.integration
def test_the_readme_offline_command_trains_on_groups_hundreds_of_versions_old(tmp_path):
    # the README's offline command on a stored run of 300 versions: at once every sampled
    # group is 1..300 versions stale (the first metrics snapshot used to kill the run)
    stored_run(tmp_path / "stored", range(300))
    rows, summary = train(
        tmp_path / "offline", f"replay.preload={tmp_path / 'stored'}", "cluster.num_actors=0",
        "algo=flowrl_tb", "replay.selector=uniform", "replay.max_times_sampled=4",
        "replay.max_staleness=null", "learner.steps=20", "replay.metrics_every=5",
    )  # fmt: skip
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert [r["version"] for r in rows] == list(range(301, 321))  # after the newest stored
    assert min(r["staleness_mean"] for r in rows) > 10
    last = replay_rows(rows)[-1]
    big = sum(last.get(f"replay_sampled_staleness_{b}", 0) for b in ("128-255", "256-511"))
    assert big > 0 and last["replay_stats_errors"] == 0
    assert summary["replay"]["inserted"] == 300 and summary["actors"] == []
