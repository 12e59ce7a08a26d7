"""The simulator's cost model: what each piece of work takes, in seconds.

A cost file (YAML or JSON, the fields of ``Costs``) is written by ``flowrl-async simulate
calibrate RUN`` from a real run's figures, or by hand from published hardware figures.

    engine step (one token for each of k running sequences) = step_s + step_per_seq_s · k
    a prompt entering the engine (prefill)                  = prefill_per_token_s · its tokens
    verifying a group                                       = verify_s
    a learner step on T tokens with L ranks                 = train_base_s + train_per_token_s · T / L
    a publication                                           = publish_base_s + publish_bytes / (link_gb_s · 1e9)
    an actor loading it                                     = load_s

Response lengths are drawn from ``lengths`` (a histogram: [length, weight] pairs).
"""

from __future__ import annotations

import bisect
import json
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class Costs:
    """Seconds per unit of work, and the response-length histogram."""

    step_s: float = 0.01
    step_per_seq_s: float = 0.0
    prefill_per_token_s: float = 0.0
    verify_s: float = 0.0
    load_s: float = 0.02
    train_base_s: float = 0.0
    train_per_token_s: float = 1e-5
    publish_base_s: float = 0.0
    publish_bytes: float = 0.0
    link_gb_s: float = 4.0
    prompt_tokens: int = 8
    lengths: list = field(default_factory=lambda: [[8, 1.0]])
    source: str = "defaults"  # where the figures come from (a run, a data sheet)

    def __post_init__(self):
        for f in fields(self):  # YAML reads 1.52e10 as a string
            if f.type in ("float", "int"):
                setattr(self, f.name, (float if f.type == "float" else int)(getattr(self, f.name)))
        if not self.lengths or any(len(p) != 2 or p[0] < 1 or p[1] < 0 for p in self.lengths):
            raise ValueError("lengths must be [length >= 1, weight >= 0] pairs")
        if sum(w for _, w in self.lengths) <= 0:
            raise ValueError("lengths needs a positive weight")
        self._values = [int(n) for n, _ in self.lengths]
        self._cum = []
        total = 0.0
        for _, w in self.lengths:
            total += w
            self._cum.append(total)

    def step(self, running: int) -> float:
        return self.step_s + self.step_per_seq_s * running

    def train(self, tokens: int, ranks: int) -> float:
        return self.train_base_s + self.train_per_token_s * tokens / ranks

    @property
    def publish_s(self) -> float:
        return self.publish_base_s + self.publish_bytes / (self.link_gb_s * 1e9)

    def draw_length(self, rng: random.Random) -> int:
        x = rng.random() * self._cum[-1]
        return self._values[min(bisect.bisect_right(self._cum, x), len(self._values) - 1)]


def load_costs(path: str | Path) -> Costs:
    """A cost file (YAML or JSON) as Costs; unknown fields are refused by name."""
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    known = {f.name for f in fields(Costs)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown cost fields {unknown}; known: {sorted(known)}")
    return Costs(**data)


def save_costs(costs: Costs, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(asdict(costs), indent=1) + "\n")
    return path
