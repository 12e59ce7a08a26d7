"""The command line: ``flowrl-async train [hydra overrides]`` (also ``python -m flowrl_async``)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import OmegaConf

from flowrl_async.config import TrainConfig, register

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
COMMANDS = {  # name -> (what it does, an example)
    "train": ("train a policy: Ray, replay service, learner, vLLM actors (a Hydra app)",
              "flowrl-async train algo=flowrl_tb replay=mixed learner.steps=500"),
    "eval": ("sample k completions per prompt of a policy and score them",
             "flowrl-async eval checkpoint=runs/x samples=64 temperature=0.6"),
    "simulate": ("simulate a run's throughput and staleness from a cost model (a Hydra app, "
                 "train's config tree); `simulate calibrate RUN` fits the costs to a run",
                 "flowrl-async simulate sim.costs=costs.json -m replay.max_staleness=0,1,4"),
    "summarize": ("one table and one plot over a set of runs (e.g. a sweep)",
                  "flowrl-async summarize multirun/<time>"),
    "replay": ("summarise, export or re-insert a stored run's groups",
               "flowrl-async replay runs/x --versions 3:7 --export groups.jsonl"),
}  # fmt: skip
HELP = "flowrl-async: asynchronous off-policy LLM RL with the FlowRL objective"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [HELP, "", "usage: flowrl-async COMMAND [arguments]", "", "commands:"]
    for name, (what, example) in COMMANDS.items():
        lines += [f"  {name:<{width}}  {what}", f"  {'':<{width}}  e.g. {example}"]
    lines += ["", "flowrl-async COMMAND --help shows each command's own options."]
    return "\n".join(lines)


def _train(cfg) -> None:
    from flowrl_async.run.launch import train

    if cfg.resume:
        cfg = _resumed(cfg)
    config: TrainConfig = OmegaConf.to_object(cfg)
    train(config)


def _resumed(cfg):
    """The run's saved config with what this command line names on top (resume.py)."""
    from hydra.core.hydra_config import HydraConfig

    from flowrl_async.run import resume

    overrides = list(HydraConfig.get().overrides.task)
    if not any(o.split("=", 1)[0].lstrip("+") == "run_dir" for o in overrides):
        raise SystemExit(
            "resume=true needs the run to continue: flowrl-async train run_dir=DIR resume=true"
        )
    saved = resume.saved_config(cfg.run_dir)
    merged, changes = resume.resumed(saved, cfg, resume.named_keys(overrides, CONFIG_DIR))
    resume.check(saved, merged, cfg.run_dir)
    print(f"resuming {cfg.run_dir} with its saved config ({resume.SAVED})"
          + ("; changed on this command line:\n  " + "\n  ".join(changes) if changes else ""))  # fmt: skip
    return OmegaConf.merge(OmegaConf.structured(TrainConfig), merged)


def _simulate(cfg) -> None:
    from flowrl_async.run.sim.run import main as simulate

    simulate(OmegaConf.to_object(cfg))


def _calibrate(argv: list[str]) -> None:
    import argparse

    from flowrl_async.run.sim.calibrate import calibrate
    from flowrl_async.run.sim.costs import save_costs

    p = argparse.ArgumentParser(prog="flowrl-async simulate calibrate",
                                description="fit a cost file to a finished run")  # fmt: skip
    p.add_argument("run", help="a run directory (summary.json, metrics.jsonl, replay/)")
    p.add_argument("--out", default=None, help="cost file to write (default: RUN/costs.json)")
    a = p.parse_args(argv)
    costs = calibrate(a.run)
    out = save_costs(costs, a.out or Path(a.run) / "costs.json")
    print(f"wrote {out}: use it with flowrl-async simulate sim.costs={out}")


def _eval(cfg) -> None:
    from flowrl_async.config import EvalConfig
    from flowrl_async.run.evaluate import run_eval

    config: EvalConfig = OmegaConf.to_object(cfg)
    run_eval(config)


def main(argv: list[str] | None = None) -> None:  # noqa: RET503
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if not argv or argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr)
        raise SystemExit(2)
    command, rest = argv[0], argv[1:]
    if command == "summarize":  # plain arguments, not a Hydra app
        from flowrl_async.run.summarize import main as summarize

        return summarize(rest)
    if command == "replay":
        from flowrl_async.replay.reader import main as replay

        return replay(rest)
    if command == "simulate" and rest[:1] == ["calibrate"]:
        return _calibrate(rest[1:])
    register()
    sys.argv = [f"flowrl-async {command}", *rest]
    if command == "train":
        try:
            hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")(_train)()
        except KeyboardInterrupt:  # launch.train left a checkpoint and said how to resume
            raise SystemExit(130) from None
    elif command == "simulate":
        hydra.main(config_path=CONFIG_DIR, config_name="simulate", version_base="1.3")(_simulate)()
    elif command == "eval":
        hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base="1.3")(_eval)()
