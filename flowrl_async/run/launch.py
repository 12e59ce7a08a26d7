"""The orchestrator: the only place that knows actors, learner and replay together.

    prepare the model (built-in tiny model + format warm-start, or a given checkpoint)
    start Ray → replay service → learner → actors
    form the weight group (learner rank 0, actors 1..N) and start the actors' loops
    for each step: learner.step() → metrics.jsonl + progress line
    stop actors, tell receivers to stop, save the final policy, shut down

Invariants: every process is stopped on the way out (normal end, error or Ctrl-C); the
resolved config and all outputs live under ``run_dir``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from flowrl_async.config import TrainConfig, validate
from flowrl_async.learner.checkpoint import latest
from flowrl_async.run import resume
from flowrl_async.run.driver import Figures, run_steps
from flowrl_async.run.offline import preload
from flowrl_async.run.placement import plan
from flowrl_async.run.processes import LearnerDied, Processes, replay_keys
from flowrl_async.run.progress import (
    MetricsLog,
    print_summary,
    summarize,
)


def prepare_model(cfg: TrainConfig, run_dir: Path) -> str:
    """The initial policy directory: a given checkpoint, or the built-in model (the tiny one
    after its format warm-start)."""
    if cfg.model.path is not None:
        return cfg.model.path
    import torch

    from flowrl_async.learner.warm_start import warm_start
    from flowrl_async.model import build_tiny_model, load_policy, load_tokenizer, save_model
    from flowrl_async.qwen2_shape import build_qwen2_shape, task_texts
    from flowrl_async.tasks import load_task

    target = run_dir / "init_model"
    if (target / "config.json").exists():
        return str(target)
    task = load_task(cfg.task.target, **cfg.task.kwargs)
    if cfg.model.builtin == "qwen2_0p5b_shape":
        raw = build_qwen2_shape(run_dir / "builtin_random", task_texts(task),
                                seed=cfg.model.init_seed)  # fmt: skip
    else:
        raw = build_tiny_model(run_dir / "builtin_random", seed=cfg.model.init_seed)
    if cfg.model.warm_start_steps <= 0:
        shutil.rmtree(target, ignore_errors=True)
        os.replace(raw, target)
        return str(target)
    model, tokenizer = load_policy(raw), load_tokenizer(raw)
    torch.manual_seed(cfg.seed)
    if not hasattr(task, "format_example"):
        raise ValueError(
            f"model.warm_start_steps={cfg.model.warm_start_steps}: task {task.name!r} has no "
            "format_example for the built-in model's format warm-start; set "
            "model.warm_start_steps=0, or give a pretrained model with model.path"
        )
    losses = warm_start(
        model, tokenizer, task, cfg.model.warm_start_steps, lr=cfg.model.warm_start_lr,
        seed=cfg.seed,
    )  # fmt: skip
    print(f"warm-start: {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return str(save_model(target, model, tokenizer))


def probe_text(cfg: TrainConfig) -> str:
    from flowrl_async.tasks import load_task

    task = load_task(cfg.task.target, **cfg.task.kwargs)
    return task.train_prompts[0].text + "123"


def start_ray(cfg: TrainConfig, run_dir: Path):
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, log_to_driver=False)
    else:
        ray.init(
            num_cpus=max(os.cpu_count() or 1, cfg.cluster.num_actors + cfg.learner.world_size),
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=f"/tmp/ray-flowrl-{os.getuid()}",
        )
    return ray


def pick_device(cfg: TrainConfig, ray) -> tuple[str, str]:
    """-> (learner device, weight-sync backend). On a cluster "auto" means: CUDA when the
    cluster has a GPU (the driver's own node may have none)."""
    import torch

    from flowrl_async.run.placement import cluster_has_gpu

    has_gpu = cluster_has_gpu(ray) if cfg.cluster.address else torch.cuda.is_available()
    use_gpu = cfg.learner.device == "cuda" or (cfg.learner.device == "auto" and has_gpu)
    backend = cfg.cluster.weight_backend
    if backend == "auto":
        backend = "nccl" if use_gpu else "gloo"
    return ("cuda" if use_gpu else "cpu"), backend


def train(cfg: TrainConfig, on_step=None) -> dict:
    """The main job. ``on_step(step, processes)`` is a hook for tests (e.g. kill an actor)."""
    validate(cfg)
    run_dir = Path(cfg.run_dir).resolve()
    if cfg.resume and not (run_dir / "checkpoints").is_dir():
        raise ValueError(f"resume=true but {run_dir} has no checkpoints/ to resume from")
    if cfg.resume:  # the settings the checkpoint holds must be the run's own
        resume.check(resume.saved_config(run_dir), asdict(cfg), run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_path = prepare_model(cfg, run_dir)
    ray = start_ray(cfg, run_dir)
    procs = None
    try:
        device, backend = pick_device(cfg, ray)
        placement = plan(ray, cfg.cluster, cfg.learner.threads, learner_gpu=device == "cuda",
                         learner_ranks=cfg.learner.world_size)  # fmt: skip
        procs = Processes(
            ray, cfg, model_path, run_dir, device, backend, probe_text(cfg), placement
        )
        start = 0
        if cfg.resume:
            resumed = procs.call_learner("resume", str(run_dir / "checkpoints"))
            start = resumed["step"]
            print(f"resumed from {resumed['path']} (step {start}, version {resumed['version']})")
            if (rewind := resumed["replay_rewind"]) is not None:
                print(f"replay service rewound to the learner's checkpoint: {rewind}")
        if cfg.replay.preload:
            address = ray.get(procs.replay.address.remote())
            where = cfg.replay.preload_filter()
            stored = preload(cfg.replay.preload, address, keys=replay_keys(cfg), where=where)
            print(f"preloaded {stored['groups']} stored groups ({stored['new']} new) from "
                  f"{cfg.replay.preload}")  # fmt: skip
            if not cfg.resume:
                procs.call_learner("start_at_version", stored["max_version"] + 1)
        # the config the run runs with now, once it started: the base of the next resume
        (run_dir / resume.SAVED).write_text(json.dumps(asdict(cfg), indent=2))
        procs.form_weight_group()  # every member starts from the learner's current weights
        if cfg.mode == "async":
            procs.start_loops()  # actors generate without pause from here on
        log = MetricsLog(run_dir, cfg.learner.steps)
        figures = Figures()
        ckpt_root, lc = str(run_dir / "checkpoints"), cfg.learner
        try:
            run_steps(procs, cfg, start, log.add, ckpt_root, figures, on_step)
        except LearnerDied as e:
            step = start + len(log.history) + 1  # the step the learner was on
            newest = latest(ckpt_root)
            how = (f"resume from {newest} with: flowrl-async train run_dir={run_dir} resume=true"
                   if newest else "no checkpoint was written yet: start the run again")  # fmt: skip
            raise RuntimeError(
                f"the run stopped at step {step}: the learner process died ({e.__cause__}). "
                f"Actors and replay service are stopped; {how}"
            ) from e
        except KeyboardInterrupt:
            print("\ninterrupted: saving a checkpoint before stopping ...", flush=True)
            path = procs.call_learner("save_checkpoint", ckpt_root, lc.keep_checkpoints)
            print(f"checkpoint: {path}\nresume with: flowrl-async train run_dir={run_dir} "
                  "resume=true")  # fmt: skip
            raise
        finally:
            log.close()
        # what the run is for first; then figures, each of which may be missing
        summary = {
            "run_dir": str(run_dir),
            "steps": len(log.history),
            "final_policy": procs.call_learner(
                "save_policy", str(run_dir / "final_policy"), heal=False
            ),
            "curves": figures.curves(run_dir),
            "learner": ray.get(procs.learner.state.remote()),
            "actor_restarts": procs.restarts,
        }  # fmt: skip
        summary["replay"] = figures.replay_stats(procs)
        summary["actors"] = procs.actor_stats()
        summary["figure_errors"] = figures.errors
        summary.update(summarize(log.history))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print_summary(summary)
        return summary
    finally:
        if procs is not None:
            procs.shutdown()
        ray.shutdown()
