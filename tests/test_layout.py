"""The one import namespace: mapped folders import as flowrl_async.*, and lint enforces it."""

import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mapped_packages_resolve_to_their_folders():
    for name, folder in [("actors", "actors"), ("learner", "learner"), ("replay", "replay")]:
        module = importlib.import_module(f"flowrl_async.{name}")
        assert Path(module.__file__).resolve().parent == ROOT / folder


def test_lint_rejects_plain_imports_of_mapped_folders(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import actors\nfrom learner.objectives import flowrl_loss\n"
        "from replay import x\nimport flowrl_async.replay\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--no-cache",
            "--config",
            str(ROOT / "pyproject.toml"),
            "--select",
            "TID251",
            str(bad),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.count("TID251") == 3, result.stdout  # the flowrl_async import is fine


def test_repository_is_lint_clean():
    for args in (["check"], ["format", "--check"]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *args, "--no-cache", str(ROOT)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stdout + result.stderr
