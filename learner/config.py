"""The learner's algorithm settings: one dataclass, used as it is by the run config's ``algo``
section (``flowrl-async train algo.beta=3``) and by the learner. Every choice list is named
here once and imported wherever it is checked."""

from __future__ import annotations

from dataclasses import dataclass

OBJECTIVES = ("flowrl", "grpo", "reinforce")  # the registry's names (learner/objective.py)
IS_MODES = ("clip", "truncate", "none", "off")
REWARD_NORMS = ("group", "raw")


@dataclass
class AlgoConfig:
    """Which objective the learner trains with, and its settings."""

    name: str = "flowrl"
    """Objective: flowrl (trajectory balance), grpo, or reinforce (flowrl_tb is a preset of
    flowrl: configs/algo/flowrl_tb.yaml)."""
    beta: float = 15.0
    """FlowRL's reward temperature β (the target tilts π_ref by exp(β·r), see the README)."""
    reward_norm: str = "group"
    """FlowRL rewards: "group" normalised (the paper) or "raw" (off-policy TB)."""
    is_mode: str = "clip"
    """Importance weights toward the current policy: clip (the paper), truncate, none (raw,
    unbounded) or off (weight 1: off-policy trajectory balance, which needs no correction)."""
    clip_low: float = 0.2
    """Lower clip ε: weights (or GRPO ratios) below 1 − ε are clipped."""
    clip_high: float = 0.2
    """Upper clip ε: weights (or GRPO ratios) above 1 + ε are clipped."""
    truncate_at: float = 10.0
    """Truncated IS: weights are capped at this value (is_mode=truncate)."""
    kl_coef: float = 0.0
    """GRPO only: weight of the k3 KL penalty toward the reference policy."""
    temperature: float | None = None
    """The temperature of the learner's log-probs; null: the actors' sampling temperature
    (generator.temperature), which the run fills in (1.0 for a learner built directly)."""

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ValueError(f"algo.name={self.name!r}: expected one of {OBJECTIVES}")
        if self.reward_norm not in REWARD_NORMS:
            raise ValueError(f"algo.reward_norm={self.reward_norm!r}: expected {REWARD_NORMS}")
