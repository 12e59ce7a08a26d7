"""The simulator against the real system (slow: three runs of the main job): calibrated from
one run, it predicts the others' learner steps/s and mean staleness within 15%."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.integration
def test_the_calibrated_simulation_predicts_three_real_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sim_validation.py"), "--steps", "100",
         "--dir", str(tmp_path)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout  # fmt: skip
    print(out)
    rows = [line for line in out.splitlines() if re.match(r"\| \d", line)]
    assert len(rows) == 3
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for err in (cells[3], cells[6]):  # steps/s and staleness errors
            assert err == "exact" or (err.endswith("%") and abs(float(err[:-1])) <= 15.0), row
