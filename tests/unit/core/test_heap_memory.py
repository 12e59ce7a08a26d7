"""return_freed_memory: freed tensors give their pages back to the system (fresh processes,
since the allocator's setting is per process and sticks)."""

import subprocess
import sys

import pytest

CHILD = """
import sys, torch
from flowrl_async.heap import return_freed_memory
if sys.argv[1] == "on":
    assert return_freed_memory()
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
big = torch.empty(16 * 2**20, dtype=torch.uint8).fill_(1)  # freed: glibc's threshold -> 16 MB
del big
before = rss()
blocks = [torch.empty(2**20, dtype=torch.uint8).fill_(1) for _ in range(300)]  # 300 MB
pin = torch.empty(16, dtype=torch.uint8)  # allocated after them: the heap cannot shrink
del blocks
print((rss() - before) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_tensors_return_to_the_system():
    kept = {
        mode: float(
            subprocess.run(
                [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True
            ).stdout
        )  # fmt: skip
        for mode in ("off", "on")
    }
    print(kept)
    assert kept["off"] > 250  # MB the process still holds after freeing 300 MB
    assert kept["on"] < 20
