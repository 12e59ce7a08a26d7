"""The one step loop, for both runtimes: the Ray processes (``processes.Processes``) and the
components wired in one process (``inline.InlineRun``).

    for step in start+1 .. steps:
        sync mode: generate this step's groups with the current weights
        metrics = learner.step()                      # sample, train, maybe publish
        every evaluation.every steps: evaluate on actor 1 with its current weights
        every replay.metrics_every steps: the replay service's figures
        log(metrics); checkpoint every checkpoint_every steps and at the end

Rule: figures (evaluation, the service's stats) never stop training: a failed read is
printed and counted (``eval_errors``, ``replay_stats_errors``), and the loop goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from flowrl_async.config import TrainConfig
from flowrl_async.replay.metrics import flat


class Runtime(Protocol):
    """The calls the step loop makes; each runtime implements them over its processes."""

    def learner_step(self) -> dict:
        """One learner step (sample, train, maybe publish) -> its metrics."""
        ...

    def generate_batch(self, batches_per_actor: int) -> float:
        """mode=sync: every actor generates this many batches now -> seconds."""
        ...

    def evaluate(self, split: str, samples: int, temperature: float, max_tokens: int) -> dict:
        """Actor 1 samples and scores the split's prompts with its current weights."""
        ...

    def replay_stats(self) -> dict:
        """The replay service's figures."""
        ...

    def save_checkpoint(self, root: str, keep: int) -> str:
        """The learner's checkpoint (with the replay service's) -> its path."""
        ...


class Figures:
    """Reads of figures that must never stop training; failures are printed and counted."""

    def __init__(self):
        self.errors = {"replay_stats": 0, "eval": 0, "curves": 0}

    def _failed(self, what: str, e: Exception) -> str:
        self.errors[what] += 1
        reason = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"\nwarning: {what} figures unavailable ({reason}); training goes on", flush=True)
        return reason

    def replay_stats(self, runtime: Runtime) -> dict:
        try:
            return runtime.replay_stats()
        except Exception as e:
            return {"unavailable": self._failed("replay_stats", e)}

    def replay(self, runtime: Runtime) -> dict:
        """The service's figures for one metrics row."""
        stats = self.replay_stats(runtime)
        return {**flat(stats), "replay_stats_errors": self.errors["replay_stats"]}

    def curves(self, run_dir) -> str:
        """curves.png of the run's metrics.jsonl; -> its path, or why there is none."""
        from flowrl_async.run.progress import plot_curves, read_metrics

        try:
            rows = read_metrics(run_dir / "metrics.jsonl")
            return str(plot_curves(rows, run_dir / "curves.png", title=str(run_dir.name)))
        except Exception as e:
            return f"unavailable: {self._failed('curves', e)}"

    def evaluation(self, runtime: Runtime, ev, max_tokens: int) -> dict:
        try:
            return runtime.evaluate(ev.split, ev.samples, ev.temperature, max_tokens)
        except Exception as e:
            self._failed("eval", e)
            return {"eval_errors": self.errors["eval"]}


def sync_batches_per_actor(cfg: TrainConfig) -> int:
    per_round = cfg.cluster.num_actors * cfg.generator.groups_per_batch
    return cfg.learner.batch_groups // per_round


def run_steps(runtime: Runtime, cfg: TrainConfig, start: int, log: Callable[[dict], None],
              checkpoints: str, figures: Figures, on_step=None) -> int:  # fmt: skip
    """Train steps ``start + 1 .. cfg.learner.steps``; -> the last step run. ``log`` gets
    each step's metrics; ``on_step(step, runtime)`` is a hook for tests."""
    lc, ev = cfg.learner, cfg.evaluation
    step = start
    for step in range(start + 1, lc.steps + 1):
        metrics = {}
        if cfg.mode == "sync":  # lock-step: generate this step's groups, then train
            metrics["generate_s"] = runtime.generate_batch(sync_batches_per_actor(cfg))
        metrics = {**runtime.learner_step(), **metrics}
        if ev.every and step % ev.every == 0:  # on actor 1, with its current weights
            metrics.update(figures.evaluation(runtime, ev, cfg.generator.max_tokens))
        if cfg.replay.metrics_every and step % cfg.replay.metrics_every == 0:
            metrics.update(figures.replay(runtime))
        log(metrics)
        if step % lc.checkpoint_every == 0 or step == lc.steps:
            runtime.save_checkpoint(checkpoints, lc.keep_checkpoints)
        if on_step is not None:
            on_step(step, runtime)
    return step
