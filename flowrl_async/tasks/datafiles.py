"""Problem files for the data-backed tasks (math, code): JSONL or Parquet rows, field lookup with
errors that name the file and line, and a seeded train/held-out split.

Invariants: rows come back in file order, so a row's index is a stable prompt id for the same
file; every error raised here names the file and the line (JSONL) or row (Parquet) at fault;
the split is a pure function of (row count, held-out fraction, seed).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Verdict:
    """A verifier's result: reward, verdict text and the answer it extracted."""

    reward: float
    info: str  # "ok" marks a correct answer; anything else is a short reason
    answer: str | None = None  # the normalised answer, for counting distinct correct ones


def resolve_path(path: str | Path) -> Path:
    """``path`` as given if it exists (or is absolute), else relative to the project root, so
    the shipped ``examples/data`` files resolve from any working directory (Ray workers)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return PROJECT_ROOT / p if (PROJECT_ROOT / p).exists() else p


def read_rows(path: str | Path) -> list[tuple[str, dict]]:
    """``(location, row)`` pairs in file order; location is ``"file:line"`` (JSONL, blank lines
    skipped) or ``"file:row i"`` (Parquet, needs pyarrow)."""
    p = resolve_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"problem file not found: {path} (cwd {Path.cwd()})")
    if p.suffix == ".parquet":
        return _read_parquet(p)
    if p.suffix not in (".jsonl", ".json", ".ndjson"):
        raise ValueError(f"{p}: unknown problem file format (use .jsonl or .parquet)")
    rows = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON: {e}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
            rows.append((where, row))
    return rows


def _read_parquet(p: Path) -> list[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"{p}: reading Parquet needs the pyarrow package (pip install pyarrow), "
            "or convert the file to JSONL"
        ) from None
    return [(f"{p}:row {i}", row) for i, row in enumerate(pq.read_table(p).to_pylist())]


def pick(row: dict, names: str | Sequence[str], where: str) -> object:
    """The value of the first field of ``names`` present in ``row``."""
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if row.get(name) is not None:
            return row[name]
    raise ValueError(f"{where}: missing field {' or '.join(map(repr, names))}")


def text_field(row: dict, names: str | Sequence[str], where: str) -> str:
    value = pick(row, names, where)
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)  # numeric gold answers are common in math data
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {names!r} must be a non-empty string, got {value!r}")
    return value


def split_ids(n: int, held_out_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) row indices, each sorted: a seeded shuffle, the first
    ``round(fraction · n)`` held out."""
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = int(round(held_out_fraction * n))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def load_split(
    path: str | Path,
    eval_path: str | Path | None,
    held_out_fraction: float,
    seed: int,
    make: Callable[[int, str, dict], object],
) -> tuple[list, list]:
    """(train, held-out) prompts, ``make(prompt_id, location, row)`` each. Prompt ids are row
    indices: ``path`` first, then ``eval_path``; with ``eval_path`` every row of ``path``
    trains, else a seeded ``held_out_fraction`` of it is held out."""
    rows = [make(i, where, row) for i, (where, row) in enumerate(read_rows(path))]
    if not rows:
        raise ValueError(f"{path}: no problems")
    if eval_path is None:
        train, held_out = split_ids(len(rows), held_out_fraction, seed)
        return [rows[i] for i in train], [rows[i] for i in held_out]
    more = [make(len(rows) + i, w, row) for i, (w, row) in enumerate(read_rows(eval_path))]
    return rows, more
