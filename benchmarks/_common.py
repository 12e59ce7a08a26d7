"""Helpers the benchmark scripts share: one thread per process, medians, a small table.

Benchmarks run as scripts (``.venv/bin/python benchmarks/<name>.py``), so this module is
imported as ``_common`` from the scripts' own folder (spawned children see it too).
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Callable

# one thread per process is the rule on a small shared machine; set before torch is imported
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


def one_thread() -> None:
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work has started: keep what it is
        pass


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(header: tuple[str, ...], rows: list[tuple], widths: tuple[int, ...]) -> str:
    """Left-aligned first column, right-aligned others; values already formatted as str."""
    lines = []
    for cells in [header, *rows]:
        parts = [f"{cells[0]:<{widths[0]}}"]
        parts += [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True)]
        lines.append("  ".join(parts))
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
