"""The command line introduces itself, and its overrides and validation messages work."""

import subprocess
import sys

CLI = [sys.executable, "-m", "flowrl_async"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command_with_an_example():
    from flowrl_async.cli import COMMANDS

    out = run("--help")
    assert out.returncode == 0
    for name, (what, example) in COMMANDS.items():
        assert f"  {name}" in out.stdout and what in out.stdout and example in out.stdout
    assert set(COMMANDS) == {"train", "eval", "summarize", "replay", "simulate"}
    unknown = run("fly")
    assert unknown.returncode == 2 and "commands:" in unknown.stderr


def test_train_help_opens_with_the_projects_header_and_shows_the_groups():
    out = run("train", "--help")
    assert out.returncode == 0
    assert out.stdout.startswith("flowrl-async train: asynchronous off-policy LLM RL")
    assert "powered by Hydra" not in out.stdout
    assert (
        "algo: flowrl, flowrl_cispo, flowrl_no_z, flowrl_tb, grpo, grpo_dapo, reinforce, vargrad"
    ) in out.stdout
    assert "replay: default, mixed" in out.stdout
    assert run("eval", "--help").stdout.startswith("flowrl-async eval: ")
    sim = run("simulate", "--help").stdout  # train's tree plus the cost model's group
    assert sim.startswith("flowrl-async simulate: ") and "sim: default, h100_7b" in sim
    assert "replay: default, mixed" in sim


def test_bad_overrides_are_refused_with_the_field_names(tmp_path):
    out = run("train", f"run_dir={tmp_path}", "algo.is_mode=bogus", "replay.selector=lifo")
    assert out.returncode == 1
    assert "invalid configuration" in out.stderr
    assert "algo.is_mode='bogus'" in out.stderr and "replay.selector='lifo'" in out.stderr
    out = run("train", f"run_dir={tmp_path}", "algo.name=ppo")
    assert out.returncode == 1 and "algo.name='ppo': expected one of" in out.stderr
    out = run("train", f"run_dir={tmp_path}", "learner.stepz=3")  # not a field
    assert out.returncode == 1 and "stepz" in out.stderr
