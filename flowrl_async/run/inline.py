"""The same components wired in one process, without Ray: the replay service on a thread,
the learner and the actors as plain objects, each actor's loop on a thread of its own, and
the weight group (gloo) formed by threads of this process.

For tests and debugging (one debugger or profiler sees every component); the product path
is ``flowrl_async.run.launch.train`` under Ray. Settings come from the same ``TrainConfig`` and
the same constructor arguments (``processes.replay_config / learner_args / actor_args``).

    summary = run_inline(cfg)        # cfg.generator.engine="torch" keeps it light
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flowrl_async.config import TrainConfig, validate
from flowrl_async.net import free_port
from flowrl_async.run.driver import Figures, run_steps
from flowrl_async.run.processes import actor_args, learner_args, replay_config


class InlineRun:
    """Every component of a run as plain objects in this process (a Runtime)."""

    def __init__(self, cfg: TrainConfig, model_path: str, run_dir: Path, probe_text: str):
        from flowrl_async.actors.worker import RolloutWorker
        from flowrl_async.learner.worker import LearnerWorker
        from flowrl_async.replay.service import ReplayService

        address = f"tcp://127.0.0.1:{free_port()}"
        self.replay = ReplayService(replay_config(cfg, run_dir, address, model_path))
        address = self.replay.address()
        args, kwargs = learner_args(cfg, model_path, address, "cpu", probe_text)
        self.learner = LearnerWorker(*args, **kwargs)
        self.actors = []
        for i in range(cfg.cluster.num_actors):
            args, kwargs = actor_args(cfg, i + 1, model_path, address)
            self.actors.append(RolloutWorker(*args, **kwargs))
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def form_weight_group(self) -> int:
        """All members join at once (each on a thread), then the learner publishes."""
        host, port = self.learner.weight_endpoint(True)
        world = len(self.actors) + 1
        with ThreadPoolExecutor(world) as pool:
            joins = [pool.submit(self.learner.init_weight_group, host, port, world, "gloo")]
            joins += [
                pool.submit(a.init_weight_group, host, port, i + 1, world, "gloo")
                for i, a in enumerate(self.actors)
            ]
            for join in joins:
                join.result()
        return self.learner.publish_current()

    def _run_actor(self, actor, max_batches: int | None) -> None:
        try:
            actor.run(max_batches)
        except BaseException as e:  # surfaced by the caller, never swallowed
            self.errors.append(e)

    def start_loops(self, max_batches: int | None = None) -> list[threading.Thread]:
        started = [
            threading.Thread(target=self._run_actor, args=(a, max_batches), daemon=True)
            for a in self.actors
        ]
        for t in started:
            t.start()
        self.threads.extend(started)
        return started

    # ---------------------------------------------------------------- the driver's calls
    def generate_batch(self, batches_per_actor: int) -> float:
        """mode=sync: every actor generates ``batches_per_actor`` batches now; -> seconds."""
        started = time.perf_counter()
        for t in self.start_loops(batches_per_actor):
            t.join()
        self.raise_errors()
        return time.perf_counter() - started

    def learner_step(self) -> dict:
        metrics = self.learner.step()
        self.raise_errors()
        return metrics

    def evaluate(self, split: str, samples: int, temperature: float, max_tokens: int) -> dict:
        return self.actors[0].evaluate(split, samples, temperature, max_tokens)

    def replay_stats(self) -> dict:
        return self.replay.stats()

    def save_checkpoint(self, root: str, keep: int) -> str:
        return self.learner.save_checkpoint(root, keep)

    def raise_errors(self) -> None:
        if self.errors:
            raise RuntimeError("a rollout actor failed") from self.errors[0]

    def shutdown(self) -> None:
        try:
            for a in self.actors:
                a.stop()
            for t in self.threads:
                t.join(timeout=60)
            self.learner.stop()
        finally:
            self.replay.stop()


def run_inline(cfg: TrainConfig, on_step=None) -> dict:
    """Train ``cfg.learner.steps`` steps with every component in this process, through the
    same step loop as the Ray runtime (``on_step(step, run)``: a hook for tests).
    -> {"history": per-step metrics, "learner", "replay", "actors": final stats}."""
    from flowrl_async.run.launch import prepare_model, probe_text

    validate(cfg)
    if cfg.learner.world_size != 1:
        raise ValueError("the inline wiring runs one learner: learner.world_size must be 1")
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    run = InlineRun(cfg, prepare_model(cfg, run_dir), run_dir, probe_text(cfg))
    history: list[dict] = []
    try:
        run.form_weight_group()
        if cfg.mode == "async":
            run.start_loops()
        run_steps(run, cfg, 0, history.append, str(run_dir / "checkpoints"), Figures(), on_step)
    finally:
        run.shutdown()
    return {
        "history": history,
        "learner": run.learner.state(),
        "replay": run.replay.stats(),
        "actors": [a.stats() for a in run.actors],
    }
