"""The objective registry: one entry per objective, each saying what it needs (π_ref? the
log Z head?), how it shapes rewards, and which pure loss of ``objectives.py`` it applies.
The learner step calls ``OBJECTIVES[algo.name]`` and nothing else knows the names; adding an
objective is one entry here (plus its loss function) and its name in ``learner/config.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Protocol

import torch

from flowrl_async.learner.config import AlgoConfig
from flowrl_async.learner.objectives import (
    LossOutput,
    flowrl_loss,
    group_normalized_rewards,
    grpo_loss,
    reinforce_loss,
    vargrad_loss,
)


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch's tensors, [N, T] per token unless said ([N] per sequence)."""

    logprobs: torch.Tensor  # log π_θ of the response tokens (with gradient)
    behavior_logprobs: torch.Tensor  # log μ, as the actors recorded them
    mask: torch.Tensor  # response tokens (bool)
    rewards: torch.Tensor  # [N], shaped by the objective
    ref_logprobs: torch.Tensor | None = None  # log π_ref, when the objective needs it
    log_z: torch.Tensor | None = None  # [N] the head's log Z(x), when the objective uses it
    group_index: torch.Tensor | None = None  # [N] which group a row belongs to


class Objective(Protocol):
    """What the learner needs to know about one objective."""

    name: ClassVar[str]
    uses_log_z: ClassVar[bool]  # trains the log Z head (its parameters join the optimizer)
    whole_groups: ClassVar[bool]  # its loss needs every row of a group in one micro-batch

    def needs_ref(self, algo: AlgoConfig) -> bool:
        """Whether the loss reads π_ref (the frozen reference is then run forward)."""
        ...

    def shape_rewards(
        self, rewards: torch.Tensor, group_index: torch.Tensor, algo: AlgoConfig
    ) -> torch.Tensor:
        """[N] rewards -> [N] what the loss uses."""
        ...

    def loss(self, x: LossInputs, algo: AlgoConfig, normalizer: float) -> LossOutput: ...

    def per_token(self, algo: AlgoConfig) -> bool:
        """True: the learner divides the step's loss by its response tokens, not sequences."""
        ...


class _PerSequence:
    def per_token(self, algo: AlgoConfig) -> bool:
        return False


class FlowRL(_PerSequence):
    """Trajectory balance with a learned partition function (arXiv 2509.15207)."""

    name, uses_log_z, whole_groups = "flowrl", True, False

    def needs_ref(self, algo: AlgoConfig) -> bool:
        return True

    def shape_rewards(self, rewards, group_index, algo):
        if algo.reward_norm == "group":  # the paper; "raw" is off-policy TB's
            return group_normalized_rewards(rewards, group_index)
        return rewards

    def loss(self, x: LossInputs, algo: AlgoConfig, normalizer: float) -> LossOutput:
        return flowrl_loss(
            x.logprobs, x.ref_logprobs, x.behavior_logprobs, x.mask, x.log_z, x.rewards,
            algo.beta, algo.is_mode, algo.clip_low, algo.clip_high, algo.truncate_at,
            normalizer=normalizer, form=algo.residual, level=algo.is_level,
            mask_low=algo.mask_low, mask_high=algo.mask_high,
        )  # fmt: skip


class FlowRLNoZ(FlowRL):
    """FlowRL's residual with log Z ≡ 0 (the authors' ablation without the partition
    function): no head; see AlgoConfig.name for what it converges to."""

    name, uses_log_z, whole_groups = "flowrl_no_z", False, False

    def loss(self, x: LossInputs, algo: AlgoConfig, normalizer: float) -> LossOutput:
        return super().loss(replace(x, log_z=torch.zeros_like(x.rewards)), algo, normalizer)


class GRPO:
    """Token-level clipped surrogate on group-normalised advantages (optional k3 KL)."""

    name, uses_log_z, whole_groups = "grpo", False, False

    def per_token(self, algo: AlgoConfig) -> bool:
        return algo.loss_agg == "token-mean"

    def needs_ref(self, algo: AlgoConfig) -> bool:
        return algo.kl_coef != 0

    def shape_rewards(self, rewards, group_index, algo):
        return group_normalized_rewards(rewards, group_index, std=algo.std_norm)

    def loss(self, x: LossInputs, algo: AlgoConfig, normalizer: float) -> LossOutput:
        return grpo_loss(
            x.logprobs, x.behavior_logprobs, x.mask, x.rewards, algo.clip_low, algo.clip_high,
            x.ref_logprobs, algo.kl_coef, normalizer=normalizer, clip_ratio_c=algo.clip_ratio_c,
            agg=algo.loss_agg, norm_len=algo.norm_len,
        )  # fmt: skip


class Reinforce(_PerSequence):
    """REINFORCE with a group-mean baseline and sequence IS weights."""

    name, uses_log_z, whole_groups = "reinforce", False, False

    def needs_ref(self, algo: AlgoConfig) -> bool:
        return False

    def shape_rewards(self, rewards, group_index, algo):
        return group_normalized_rewards(rewards, group_index, std=algo.std_norm)

    def loss(self, x: LossInputs, algo: AlgoConfig, normalizer: float) -> LossOutput:
        return reinforce_loss(
            x.logprobs, x.behavior_logprobs, x.mask, x.rewards, algo.is_mode, algo.clip_low,
            algo.clip_high, algo.truncate_at, normalizer=normalizer, level=algo.is_level,
            mask_low=algo.mask_low, mask_high=algo.mask_high,
        )  # fmt: skip


class VarGrad(_PerSequence):
    """Trajectory balance with log Z estimated per group from the batch (no head, no IS)."""

    name, uses_log_z, whole_groups = "vargrad", False, True

    def needs_ref(self, algo: AlgoConfig) -> bool:
        return True

    def shape_rewards(self, rewards, group_index, algo):
        if algo.reward_norm == "group":
            return group_normalized_rewards(rewards, group_index, std=algo.std_norm)
        return rewards

    def loss(self, x: LossInputs, algo: AlgoConfig, normalizer: float) -> LossOutput:
        return vargrad_loss(x.logprobs, x.ref_logprobs, x.mask, x.rewards, x.group_index,
                            algo.beta, normalizer=normalizer, form=algo.residual)  # fmt: skip


OBJECTIVES: dict[str, Objective] = {
    o.name: o for o in (FlowRL(), FlowRLNoZ(), GRPO(), Reinforce(), VarGrad())
}
