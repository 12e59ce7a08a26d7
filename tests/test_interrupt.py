"""Ctrl-C on the main job: every process stops and a resumable checkpoint is left behind."""

import json
import signal
import subprocess
import sys
import time

import pytest


@pytest.mark.integration
def test_ctrl_c_leaves_a_resumable_checkpoint(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "flowrl_async", "train", f"run_dir={run}",
           "learner.steps=1000", "learner.batch_groups=4", "model.warm_start_steps=5",
           "generator=torch"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # wait until a few steps are done
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-2000:]
    assert "resume with: flowrl-async train" in out, out[-2000:]
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert ckpts, out[-2000:]
    state = json.loads((ckpts[-1] / "extra.json").read_text())
    assert "replay_checkpoint" in state
    logged = len(metrics.read_text().splitlines())
    # the checkpoint holds every step the learner finished: the logged ones, plus the one in
    # flight when Ctrl-C arrived (the checkpoint waits for it; its metrics line is not written)
    assert ckpts[-1].name in (f"step-{logged:08d}", f"step-{logged + 1:08d}")
