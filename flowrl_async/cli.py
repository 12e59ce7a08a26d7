"""The command line: ``flowrl-async train [hydra overrides]`` (also ``python -m flowrl_async``)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import OmegaConf

from flowrl_async.config import TrainConfig, register

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
COMMANDS = ("train", "eval", "summarize", "replay")


def _train(cfg) -> None:
    from flowrl_async.launch import train

    config: TrainConfig = OmegaConf.to_object(cfg)
    train(config)


def _eval(cfg) -> None:
    from flowrl_async.config import EvalConfig
    from flowrl_async.evaluate import run_eval

    config: EvalConfig = OmegaConf.to_object(cfg)
    run_eval(config)


def main(argv: list[str] | None = None) -> None:  # noqa: RET503
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: flowrl-async {{{','.join(COMMANDS)}}} [key=value ...]", file=sys.stderr)
        raise SystemExit(2)
    command, rest = argv[0], argv[1:]
    if command == "summarize":  # plain arguments, not a Hydra app
        from flowrl_async.summarize import main as summarize

        return summarize(rest)
    if command == "replay":
        from flowrl_async.replay.reader import main as replay

        return replay(rest)
    register()
    sys.argv = [f"flowrl-async {command}", *rest]
    if command == "train":
        hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")(_train)()
    elif command == "eval":
        hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base="1.3")(_eval)()
