"""Atomic learner checkpoints: ``<root>/step-%08d/`` with the policy in Hugging Face format
(loadable by transformers and vLLM) and ``training_state.pt`` (log Z head, optimizer,
scheduler, RNG states, step, version) plus ``extra.json`` (e.g. the replay checkpoint path).

Invariants: a checkpoint directory exists only complete (written as a hidden temp dir, then
renamed); ``latest`` never returns a partial one; only the newest ``keep`` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from flowrl_async.model import cpu_state

PREFIX = "step-"


def save_checkpoint(root, step: int, policy, tokenizer, training_state: dict, extra: dict,
                    keep: int = 3, policy_state: dict | None = None) -> Path:  # fmt: skip
    """``policy_state``: the full weights to write (default: the policy's own)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        weights = cpu_state(policy) if policy_state is None else policy_state
        policy.save_pretrained(tmp / "policy", safe_serialization=True, state_dict=weights)
        tokenizer.save_pretrained(tmp / "policy")
        torch.save(training_state, tmp / "training_state.pt")
        (tmp / "extra.json").write_text(json.dumps(extra, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(root) -> list[Path]:
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and p.is_dir())


def latest(root) -> Path | None:
    found = checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path) -> tuple[dict, dict, dict]:
    """-> (policy state dict, training state, extra)."""
    path = Path(path)
    policy_state = {}
    for f in sorted((path / "policy").glob("*.safetensors")):
        policy_state.update(load_file(str(f)))
    state = torch.load(path / "training_state.pt", weights_only=False)
    extra = json.loads((path / "extra.json").read_text())
    return policy_state, state, extra
