"""The chunked output layer's memory, in fresh processes: for T = 4096 positions and a
151,936-token vocabulary (Qwen2's), forward + backward of the chunked path fits under an
address-space limit of 1 GB above what the process holds before it starts, which the
one-shot path cannot (its float32 logits alone are 4096 × 151936 × 4 B = 2.49 GB)."""

import json
import subprocess
import sys

import pytest

PROGRAM = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
from flowrl_async.learner.logprobs import token_logprobs
chunk, bound = (None if sys.argv[1] == "none" else int(sys.argv[1])), float(sys.argv[2])
t, h, v = 4096, 32, 151_936
g = torch.Generator().manual_seed(0)
hidden = torch.randn(1, t, h, generator=g, requires_grad=True)
weight = (torch.randn(v, h, generator=g) * 0.02).requires_grad_()
targets = torch.randint(0, v, (1, t), generator=g)
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + int(bound * 2**30),) * 2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    lp, _ = token_logprobs(hidden, weight, None, targets, 1.0, chunk=chunk)
    lp.sum().backward()
except RuntimeError as e:  # the allocator could not get the memory
    print(json.dumps({"fits": False, "error": str(e)[:200]}))
    sys.exit(0)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"fits": True, "peak_extra_gb": (after - before) / 2**20}))
"""
BOUND_GB = 1.0


def run(chunk: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROGRAM, chunk, str(BOUND_GB)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_chunked_log_probs_fit_a_bound_the_one_shot_path_exceeds():
    chunked, one_shot = run("128"), run("none")
    print(chunked, one_shot)
    assert chunked["fits"] and chunked["peak_extra_gb"] < BOUND_GB, chunked
    assert not one_shot["fits"] and "memory" in one_shot["error"].lower(), one_shot
