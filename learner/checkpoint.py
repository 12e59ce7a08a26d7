"""Atomic learner checkpoints, written by every learner rank: ``<root>/step-%08d/`` holds

    state/         torch.distributed.checkpoint: policy (fp32 master weights) + log Z head
                   ("model") and the optimizer ("optim"), each rank writing its shards; any
                   number of ranks loads it (DCP reshards on load)
    trainer.pt     scheduler, step, version (rank 0)
    rng-<rank>.pt  each rank's RNG states
    policy/        the policy in Hugging Face format (transformers and vLLM load it),
                   exported by rank 0 from the gathered weights
    extra.json     e.g. the replay checkpoint taken with it

Invariants: a checkpoint directory exists only complete: every rank writes into one hidden
``.step-%08d.partial`` directory (that every rank sees the same one is checked first), and
rank 0 renames it once every rank reported success at each phase (on a failure anywhere,
every rank raises and nothing is renamed); ``latest`` never returns
a partial one; only the newest ``keep`` are kept. Several nodes need one shared file system.
Checkpoints of the earlier single-file layout (``training_state.pt``) still load.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

PREFIX = "step-"
SHARED = ".rank0"  # written by rank 0 first: every rank must see it


def save(root, learner, tokenizer, keep: int = 3, extra=dict) -> Path:
    """Checkpoint ``learner`` (learner.Learner) under ``root``: a collective every rank
    joins. ``extra()`` is called on rank 0 only, when the state is written."""
    ranks = learner.ranks
    tmp = begin(root, learner.step_count, ranks)
    learner.save_state(tmp)  # DCP: a failed write raises on every rank
    phase(ranks, tmp, lambda: learner.save_local_state(tmp))
    weights = learner.full_policy_state()  # gathered: every rank joins

    def export() -> None:
        if ranks.rank == 0:
            write_policy(tmp, learner.policy, tokenizer, weights)
            write_extra(tmp, extra())

    phase(ranks, tmp, export)
    return commit(tmp, ranks, keep)


def phase(ranks, tmp: Path, part) -> None:
    """This rank's ``part`` of the checkpoint; then every rank learns whether every part
    succeeded (a collective, so no rank is left in a later one): if not, every rank raises
    (a failed one its own error) and nothing is kept."""
    error = None
    try:
        part()
    except Exception as e:
        error = e
    if not ranks.all_ok(error is None):
        if ranks.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error
        raise RuntimeError(f"checkpoint {tmp.name}: another learner rank failed; nothing kept")


def load(path, learner) -> dict:
    """Load checkpoint ``path`` into ``learner`` (every rank; any number of ranks);
    -> its trainer state (step, version, scheduler)."""
    if is_legacy(path):
        policy_state, state = load_legacy(path)
        learner.load_training_state(state, policy_state)
        return state
    return learner.load_state(Path(path))


def begin(root, step: int, ranks) -> Path:
    """The hidden directory every rank writes checkpoint ``step`` into (a collective)."""
    tmp = Path(root) / f".{PREFIX}{step:08d}.partial"

    def create() -> None:
        if ranks.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a crash mid-write left it
            tmp.mkdir(parents=True)
            (tmp / SHARED).write_text(str(step))

    phase(ranks, tmp, create)
    if not ranks.all_ok((tmp / SHARED).is_file()):  # each rank writes its shards here
        raise RuntimeError(
            f"checkpoint root {root} is not one directory for every learner rank (a rank on "
            "another node does not see rank 0's files): put run_dir on a shared file system"
        )
    return tmp


def commit(tmp: Path, ranks, keep: int = 3) -> Path:
    """Every part is written: rank 0 renames ``tmp`` to its final name and prunes old
    checkpoints (a collective); -> the final path."""
    final = tmp.parent / tmp.name.removeprefix(".").removesuffix(".partial")
    if ranks.rank == 0:
        (tmp / SHARED).unlink(missing_ok=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(tmp.parent)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    ranks.barrier()  # nobody reads the checkpoint before it has its final name
    return final


def write_policy(directory: Path, policy, tokenizer, weights: dict) -> None:
    """The Hugging Face export (rank 0; ``weights``: the full state dict on the CPU)."""
    policy.save_pretrained(directory / "policy", safe_serialization=True, state_dict=weights)
    tokenizer.save_pretrained(directory / "policy")


def write_extra(directory: Path, extra: dict) -> None:
    (directory / "extra.json").write_text(json.dumps(extra, indent=2))


def read_extra(path) -> dict:
    return json.loads((Path(path) / "extra.json").read_text())


def is_legacy(path) -> bool:
    """A checkpoint of the single-file layout (``training_state.pt``, full tensors)."""
    return (Path(path) / "training_state.pt").is_file()


def checkpoints(root) -> list[Path]:
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and p.is_dir())


def latest(root) -> Path | None:
    found = checkpoints(root)
    return found[-1] if found else None


def load_legacy(path) -> tuple[dict, dict]:
    """A single-file-layout checkpoint -> (policy state dict, training state)."""
    path = Path(path)
    policy_state = {}
    for f in sorted((path / "policy").glob("*.safetensors")):
        policy_state.update(load_file(str(f)))
    return policy_state, torch.load(path / "training_state.pt", weights_only=False)
