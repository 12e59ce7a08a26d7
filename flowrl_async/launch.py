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
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

from flowrl_async.config import TrainConfig, validate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def prepare_model(cfg: TrainConfig, run_dir: Path) -> str:
    """The initial policy directory: a given checkpoint, or the tiny model after warm-start."""
    if cfg.model.path is not None:
        return cfg.model.path
    import torch

    from flowrl_async.learner.warm_start import warm_start
    from flowrl_async.model import build_tiny_model, load_policy, load_tokenizer, save_model
    from flowrl_async.tasks import load_task

    target = run_dir / "init_model"
    if (target / "config.json").exists():
        return str(target)
    raw = build_tiny_model(run_dir / "tiny_random", seed=cfg.model.init_seed)
    model, tokenizer = load_policy(raw), load_tokenizer(raw)
    if cfg.model.warm_start_steps > 0:
        torch.manual_seed(cfg.seed)
        task = load_task(cfg.task.target, **cfg.task.kwargs)
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
            num_cpus=max(os.cpu_count() or 1, cfg.cluster.num_actors + 1),
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=f"/tmp/ray-flowrl-{os.getuid()}",
        )
    return ray


def train(cfg: TrainConfig) -> dict:
    validate(cfg)
    run_dir = Path(cfg.run_dir).resolve()
    if cfg.resume and not (run_dir / "checkpoints").is_dir():
        raise ValueError(f"resume=true but {run_dir} has no checkpoints/ to resume from")
    run_dir.mkdir(parents=True, exist_ok=True)
    name = "config.resumed.json" if cfg.resume else "config.json"
    (run_dir / name).write_text(json.dumps(asdict(cfg), indent=2))
    model_path = prepare_model(cfg, run_dir)
    ray = start_ray(cfg, run_dir)
    import torch

    from flowrl_async.actors.generator import SampleSpec
    from flowrl_async.actors.worker import RolloutWorker
    from flowrl_async.learner.learner import AlgoConfig
    from flowrl_async.learner.worker import LearnerWorker
    from flowrl_async.replay.server import ServerConfig
    from flowrl_async.replay.service import ReplayService

    use_gpu = cfg.learner.device == "cuda" or (
        cfg.learner.device == "auto" and torch.cuda.is_available()
    )
    device = "cuda" if use_gpu else "cpu"
    backend = cfg.cluster.weight_backend
    if backend == "auto":
        backend = "nccl" if use_gpu else "gloo"
    lc, gc, rc = cfg.learner, cfg.generator, cfg.replay
    handles = []
    try:
        replay = ray.remote(num_cpus=0)(ReplayService).remote(
            ServerConfig(
                directory=str(run_dir / "replay"),
                address="tcp://127.0.0.1:0",
                capacity=rc.capacity,
                max_staleness=rc.max_staleness,
                selector=rc.selector,
                max_times_sampled=rc.max_times_sampled,
                groups_per_version=lc.batch_groups * lc.publish_every,
                fsync=rc.fsync,
                fsync_interval_ms=rc.fsync_interval_ms,
                seed=cfg.seed,
            )
        )
        handles.append(replay)
        address = ray.get(replay.address.remote())
        learner = (
            ray.remote(LearnerWorker)
            .options(
                num_cpus=lc.threads,
                num_gpus=1 if use_gpu else 0,
                max_concurrency=2,
                runtime_env={"env_vars": threads_env(lc.threads)},
            )
            .remote(
                model_path,
                AlgoConfig(**asdict(cfg.algo), temperature=gc.temperature),
                address,
                batch_groups=lc.batch_groups,
                micro_batch=lc.micro_batch,
                lr=lc.lr,
                log_z_lr=lc.log_z_lr,
                grad_clip=lc.grad_clip,
                warmup_steps=lc.warmup_steps,
                publish_every=lc.publish_every,
                probe_text=probe_text(cfg),
                seed=cfg.seed,
                threads=lc.threads,
                device=device,
                sample_timeout_s=lc.sample_timeout_s,
            )  # fmt: skip
        )
        handles.append(learner)
        spec = SampleSpec(gc.n, gc.temperature, gc.top_p, gc.max_tokens)
        actors = [
            ray.remote(RolloutWorker)
            .options(
                num_cpus=cfg.cluster.actor_threads,
                max_concurrency=3,
                max_restarts=cfg.cluster.max_actor_restarts,
                # every thread of the process (Ray runs calls on pool threads) must see the
                # engine's thread count: vLLM's CPU kernels check it on each call
                runtime_env={"env_vars": threads_env(cfg.cluster.actor_threads)},
            )
            .remote(
                i + 1,
                model_path,
                cfg.task.target,
                dict(cfg.task.kwargs),
                address,
                spec,
                groups_per_batch=gc.groups_per_batch,
                engine=gc.engine,
                data_seed=cfg.seed,
                seed=cfg.seed,
                threads=cfg.cluster.actor_threads,
                max_model_len=cfg.model.max_model_len,
                dtype=cfg.model.dtype,
                probe_tolerance=gc.probe_tolerance,
            )  # fmt: skip
            for i in range(cfg.cluster.num_actors)
        ]
        handles.extend(actors)
        ray.get([h.ready.remote() for h in [learner, *actors]])
        port, world = free_port(), len(actors) + 1
        ray.get(
            [learner.init_weight_group.remote("127.0.0.1", port, world, backend)]
            + [
                a.init_weight_group.remote("127.0.0.1", port, i + 1, world, backend)
                for i, a in enumerate(actors)
            ]
        )
        start_step = 0
        if cfg.resume:
            resumed = ray.get(learner.resume.remote(str(run_dir / "checkpoints")))
            start_step = resumed["step"]
            print(
                f"resumed from {resumed['path']} (step {start_step}, version {resumed['version']})"
            )
        ray.get(learner.publish_current.remote())  # every member starts from current weights
        loops = [a.run.remote() for a in actors]
        ckpt = Checkpointer(ray, learner, run_dir / "checkpoints", lc.checkpoint_every,
                            lc.keep_checkpoints)  # fmt: skip
        try:
            history = run_steps(ray, learner, start_step, lc.steps, run_dir, loops, ckpt)
        except KeyboardInterrupt:
            print("\ninterrupted: saving a checkpoint before stopping ...", flush=True)
            print(
                f"checkpoint: {ckpt.save()}\nresume with: flowrl-async train "
                f"run_dir={run_dir} resume=true"
            )
            raise
        ckpt.save()
        summary = {
            "run_dir": str(run_dir),
            "steps": len(history),
            "replay": ray.get(replay.stats.remote()),
            "actors": ray.get([a.stats.remote() for a in actors]),
            "final_policy": ray.get(learner.save_policy.remote(str(run_dir / "final_policy"))),
        }
        summary.update(summarize(history))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print_summary(summary)
        return summary
    finally:
        shutdown(ray, handles)


def check_actors(ray, loops) -> None:
    """An actor loop that returned early failed: surface its error now."""
    finished, _ = ray.wait(loops, num_returns=len(loops), timeout=0)
    for ref in finished:
        ray.get(ref)  # raises the actor's exception
        raise RuntimeError("a rollout actor stopped before the learner finished")


class Checkpointer:
    def __init__(self, ray, learner, root: Path, every: int, keep: int):
        self.ray, self.learner, self.root, self.every, self.keep = ray, learner, root, every, keep

    def maybe_save(self, step: int) -> None:
        if step % self.every == 0:
            self.save()

    def save(self) -> str:
        return self.ray.get(self.learner.save_checkpoint.remote(str(self.root), self.keep))


def run_steps(ray, learner, start: int, steps: int, run_dir: Path, loops, ckpt) -> list[dict]:
    history = []
    started = time.time()
    with open(run_dir / "metrics.jsonl", "a") as f:
        for _ in range(start, steps):
            step_ref = learner.step.remote()
            while not ray.wait([step_ref], timeout=1.0)[0]:
                check_actors(ray, loops)
            m = ray.get(step_ref)
            check_actors(ray, loops)
            m["time"] = time.time() - started
            history.append(m)
            f.write(json.dumps(m) + "\n")
            f.flush()
            progress(m, steps)
            ckpt.maybe_save(int(m["step"]))
    if sys.stdout.isatty():
        print()
    return history


def progress(m: dict, steps: int) -> None:
    line = (
        f"step {int(m['step']):>4}/{steps}  v{int(m['version'])}  "
        f"reward {m['reward_mean']:.3f}  acc {m['accuracy']:.3f}  "
        f"distinct {m['distinct_correct']:.2f}  "
        f"stale {m['staleness_mean']:.2f}  tok/s {m['tokens'] / max(m['step_s'], 1e-9):,.0f}  "
        f"wait {m['wait_s']:.2f}s  loss {m['loss']:.4f}"
    )
    if sys.stdout.isatty():
        print("\r" + line, end="", flush=True)
    elif int(m["step"]) % 10 == 0 or int(m["step"]) == steps:
        print(line, flush=True)


def summarize(history: list[dict]) -> dict:
    if not history:
        return {}
    k = max(1, len(history) // 5)
    first, last = history[:k], history[-k:]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    return {
        "reward_first": mean(first, "reward_mean"),
        "reward_last": mean(last, "reward_mean"),
        "accuracy_first": mean(first, "accuracy"),
        "accuracy_last": mean(last, "accuracy"),
        "distinct_correct_first": mean(first, "distinct_correct"),
        "distinct_correct_last": mean(last, "distinct_correct"),
        "wall_s": history[-1]["time"],
        "learner_wait_fraction": sum(r["wait_s"] for r in history)
        / max(sum(r["step_s"] for r in history), 1e-9),
    }


def print_summary(s: dict) -> None:
    print(
        f"\ndone: {s['steps']} steps in {s.get('wall_s', 0):.0f}s  "
        f"reward {s.get('reward_first', 0):.3f} -> {s.get('reward_last', 0):.3f}  "
        f"accuracy {s.get('accuracy_first', 0):.3f} -> {s.get('accuracy_last', 0):.3f}\n"
        f"run dir: {s['run_dir']}\nfinal policy: {s['final_policy']}"
    )


def shutdown(ray, handles) -> None:
    learner_and_actors = handles[1:]
    for h in learner_and_actors[1:]:
        try:
            h.stop.remote()
        except Exception:
            pass
    if learner_and_actors:
        try:
            ray.get(learner_and_actors[0].stop.remote(), timeout=30)
        except Exception:
            pass
    time.sleep(0.5)
    for h in handles:
        try:
            ray.kill(h)
        except Exception:
            pass
    ray.shutdown()
