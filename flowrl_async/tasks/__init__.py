"""Tasks: prompts with stable ids and a verifier; ``PromptSource`` turns stream positions
(handed out by the replay service at admission) into prompts.

Invariants: position → prompt is a pure function of (position, seed, prompt list), so one
integer cursor checkpoints the data stream; each epoch visits every prompt once in a
seeded shuffled order.
"""

from __future__ import annotations

import importlib
import random
from typing import Any, Protocol


class Task(Protocol):
    """What a task gives the system: prompts and a verifier."""

    name: str
    train_prompts: list
    eval_prompts: list

    def verify(self, prompt, completion: str) -> Any:
        """-> an object with ``reward: float`` and ``info: str``; never raises.

        ``info == "ok"`` marks a correct answer (accuracy and distinct-answer metrics count
        those); anything else is a short reason ("wrong sum", "timeout", ...).
        """
        ...


def load_task(target: str, **kwargs) -> Task:
    """A task class by import path ("package.module:Class" or "package.module.Class")."""
    module, _, name = target.replace(":", ".").rpartition(".")
    return getattr(importlib.import_module(module), name)(**kwargs)


class PromptSource:
    """The prompt stream: a position maps to a prompt, so the data cursor is one number."""

    def __init__(self, task: Task, seed: int = 0, split: str = "train"):
        self.task, self.seed = task, seed
        self.items = task.train_prompts if split == "train" else task.eval_prompts
        if not self.items:
            raise ValueError(f"task {task.name!r} has no {split} prompts")
        self._orders: dict[int, list[int]] = {}

    @property
    def task_name(self) -> str:
        return self.task.name

    def at(self, position: int):
        epoch, offset = divmod(position, len(self.items))
        order = self._orders.get(epoch)
        if order is None:
            order = list(range(len(self.items)))
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
            self._orders = {epoch: order}
        return self.items[order[offset]]

    def verify(self, prompt, completion: str):
        try:
            return self.task.verify(prompt, completion)
        except Exception as e:  # a verifier bug must not stop the actor
            return _Failed(f"verifier error: {type(e).__name__}: {e}")


class _Failed:
    reward = 0.0

    def __init__(self, info: str):
        self.info = info
