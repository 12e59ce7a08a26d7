"""Ctrl-C on the main job: every process stops, a resumable checkpoint is left behind, the
run ends with the message and exit status 130, and the command it prints continues the run
with its own (non-default) settings."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def interrupt_after(cmd: list[str], metrics: Path, rows: int, timeout_s: float = 240):
    """Start ``cmd``, send SIGINT once metrics.jsonl has ``rows`` lines; -> (status, output)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # a shell without job control starts background jobs with SIGINT ignored, and children
    # inherit that (Python then installs no KeyboardInterrupt handler). A handled signal is
    # reset to its default by exec: with Python's handler set here while the job starts, the
    # job gets Ctrl-C however pytest itself was started
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, inherited)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def printed_command(out: str) -> list[str]:
    """The arguments of the ``resume with: flowrl-async ...`` line, to the letter."""
    line = re.search(r"resume with: flowrl-async (.+)", out)
    assert line, out[-2000:]
    return shlex.split(line.group(1))


@pytest.mark.integration
def test_ctrl_c_leaves_a_resumable_checkpoint_and_the_printed_command_resumes_it(tmp_path):
    run = tmp_path / "run"
    cli = [sys.executable, "-m", "flowrl_async"]
    cmd = [*cli, "train", f"run_dir={run}", "algo=grpo", "learner.lr=2e-4",
           "learner.steps=1000", "learner.batch_groups=4", "model.warm_start_steps=5",
           "generator=torch"]  # fmt: skip
    metrics = run / "metrics.jsonl"
    status, out = interrupt_after(cmd, metrics, rows=3)
    assert status == 130, out[-2000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-2000:]
    assert "resume with: flowrl-async train" in out, out[-2000:]
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert ckpts, out[-2000:]
    state = json.loads((ckpts[-1] / "extra.json").read_text())
    assert "replay_checkpoint" in state
    logged = len(metrics.read_text().splitlines())
    # the checkpoint holds every step the learner finished: the logged ones, plus the one in
    # flight when Ctrl-C arrived (the checkpoint waits for it; its metrics line is not written)
    assert ckpts[-1].name in (f"step-{logged:08d}", f"step-{logged + 1:08d}")

    # the printed command, to the letter: it continues as GRPO at lr 2e-4 (before the fix it
    # started from the defaults, tried FlowRL and died loading the optimizer state)
    resumed = printed_command(out)
    assert resumed == ["train", f"run_dir={run}", "resume=true"]
    status, out = interrupt_after([*cli, *resumed], metrics, rows=logged + 3)
    assert status == 130, out[-3000:]
    assert f"resuming {run} with its saved config" in out, out[-2000:]
    config = json.loads((run / "run_config.json").read_text())
    assert config["algo"]["name"] == "grpo" and config["learner"]["lr"] == 2e-4
    assert config["resume"] is True
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    after = rows[logged:]
    assert len(after) >= 3 and after[0]["step"] == int(ckpts[-1].name.split("-")[1]) + 1
    assert all("clip_fraction" in r and "log_z" not in r for r in after)  # GRPO's figures
