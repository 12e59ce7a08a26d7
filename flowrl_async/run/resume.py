"""Resuming a run as it was configured.

Rules:
- the base is the run's own saved config (``run_dir/run_config.json``, rewritten at every
  start), never the defaults: ``flowrl-async train run_dir=X resume=true`` continues X with
  the settings X ran with;
- only what the resume's command line names applies on top: a ``key=value`` override sets
  that key; a group choice (``algo=grpo``) sets the whole section as that option defines
  it; every change is listed at start;
- what the checkpoint holds cannot change (``PINNED``): an override that contradicts it is
  refused with a message naming each such key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

SAVED = "run_config.json"
PINNED = {
    "algo.name": "the objective decides the optimizer's parameter groups and the log Z head",
    "model.path": "the checkpoint holds this model's weights",
    "model.builtin": "the run's initial policy and reference were built as this model",
    "model.init_seed": "the run's initial policy and reference were built from it",
    "model.warm_start_steps": "the run's initial policy (init_model/) was warm-started so",
    "model.warm_start_lr": "the run's initial policy (init_model/) was warm-started so",
}
# what a pinned key meant in saved configs written before the key existed
PINNED_BEFORE = {"model.builtin": "tiny"}
NOT_SETTINGS = ("run_dir", "resume")  # say where and how to start, not how to train
GROUPS = ("algo", "model", "task", "generator", "replay", "learner", "cluster")


def saved_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / SAVED
    if not path.is_file():
        raise ValueError(f"resume=true but {path} does not exist: {run_dir} is not a run")
    return json.loads(path.read_text())


def named_keys(overrides: list[str], config_dir: str | Path) -> list[str]:
    """The dotted keys a command line sets: each ``key=value``'s key; a group choice
    ``group=option`` sets its whole section (as that option defines it: ``replay=default``
    is every replay key at its default)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys: list[str] = []
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group
        if key.startswith("hydra.") or key == "hydra" or key in NOT_SETTINGS:
            continue
        keys.append(key)  # a group name selects the whole section (resumed() copies it)
    return keys


def resumed(saved: dict, composed: DictConfig, keys: list[str]) -> tuple[dict, list[str]]:
    """The saved config with the value ``composed`` has for each of ``keys``;
    -> (that config, one line per key whose value changed: ``key: old -> new``)."""
    base = OmegaConf.create(saved)
    changes = []
    for key in keys:
        old = OmegaConf.select(base, key, default=None)
        new = OmegaConf.select(composed, key, default=None)
        if isinstance(new, DictConfig):
            new = OmegaConf.to_container(new)
        if isinstance(old, DictConfig):
            old = OmegaConf.to_container(old)
        if key in GROUPS and isinstance(old, dict) and isinstance(new, dict):
            changes += [f"{key}.{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items()
                        if old.get(k) != v]  # fmt: skip
        elif old != new:
            changes.append(f"{key}: {old!r} -> {new!r}")
        OmegaConf.update(base, key, new, merge=False, force_add=True)
    OmegaConf.update(base, "resume", True)
    OmegaConf.update(base, "run_dir", composed.run_dir)  # as this command line names it
    return OmegaConf.to_container(base), changes


def contradictions(saved: dict, config: dict) -> list[str]:
    """Each pinned key whose value differs between the saved config and ``config``."""
    out = []
    for key, why in PINNED.items():
        old, new = _get(saved, key), _get(config, key)
        old = PINNED_BEFORE.get(key) if old is None else old
        if old != new:
            out.append(f"{key}: the run has {old!r}, the command line asks for {new!r} ({why})")
    return out


def check(saved: dict, config: dict, run_dir: str | Path) -> None:
    if problems := contradictions(saved, config):
        raise ValueError(
            f"resume=true: cannot continue {run_dir} with other settings that its checkpoint "
            "holds:\n  - " + "\n  - ".join(problems) + "\nstart a new run_dir instead"
        )


def _get(tree: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree
