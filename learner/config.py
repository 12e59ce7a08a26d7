"""The learner's algorithm settings: one dataclass, used as it is by the run config's ``algo``
section (``flowrl-async train algo.beta=3``) and by the learner. Every choice list is named
here once and imported wherever it is checked."""

from __future__ import annotations

from dataclasses import dataclass

OBJECTIVES = (
    "flowrl",
    "flowrl_no_z",
    "grpo",
    "reinforce",
    "vargrad",
)  # the registry's names (learner/objective.py)
IS_MODES = ("clip", "truncate", "mask", "none", "off")
IS_LEVELS = ("sequence", "geometric", "token")  # token: flowrl, flowrl_no_z and reinforce
LOSS_AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")  # grpo
REWARD_NORMS = ("group", "raw")
TRUNCATED = ("keep", "drop", "zero_reward")
RESIDUALS = ("mean", "sum", "sum_over_len")  # objectives.residual: each form's target there


@dataclass
class AlgoConfig:
    """Which objective the learner trains with, and its settings."""

    name: str = "flowrl"
    """Objective: flowrl (trajectory balance), flowrl_no_z (the FlowRL authors' ablation:
    the same residual with log Z ≡ 0, no head; δ = 0 for every answer is then reachable only
    if Σ_y π_ref·exp(β r) = 1 (sum forms; mean: Σ_y π_ref·exp(|y|·β r) = 1), so it regresses
    toward the target's shape, not onto a distribution), grpo, reinforce, or vargrad (trajectory balance with log Z the group's
    mean residual, no head; flowrl_tb is a preset of flowrl: configs/algo/flowrl_tb.yaml)."""
    beta: float = 15.0
    """FlowRL's reward temperature β: the target tilts π_ref by exp(β·r) in the sum forms and
    by exp(|y|·β·r) in the mean form (``residual``; the README has each target)."""
    residual: str = "mean"
    """FlowRL's residual form, and with it the distribution it converges to (|y|: response
    length): mean (the paper's; π ∝ π_ref·exp(|y|·(β r − c)): the effective β grows with
    length, longer answers of equal reward win), sum (true trajectory balance:
    π ∝ π_ref·exp(β r)), sum_over_len (sum's target with the gradient scale of mean)."""
    reward_norm: str = "group"
    """FlowRL rewards: "group" normalised (the paper) or "raw" (off-policy TB)."""
    is_mode: str = "clip"
    """Importance weights toward the current policy: clip (the paper), truncate, none (raw,
    unbounded) or off (weight 1: off-policy trajectory balance, which needs no correction)."""
    is_level: str = "sequence"
    """What one importance ratio covers: sequence (exp Σ_t of the token log-ratios: exact,
    but it saturates any clip on long responses), geometric (exp mean_t: GSPO-style, one
    ratio per sequence on a per-token scale), token (flowrl, flowrl_no_z, reinforce: each
    token's gradient scaled by its own ratio, limited by is_mode; with is_mode=clip the
    FlowRL authors' CISPO-style variant, weights clipped to [1 − clip_low, 1 + clip_high])."""
    mask_low: float = 0.5
    """is_mode=mask (IcePop/MIS): ratios below this get weight 0."""
    mask_high: float = 2.0
    """is_mode=mask: ratios above this get weight 0; those in [mask_low, mask_high] keep
    their raw value."""
    clip_low: float = 0.2
    """Lower clip ε: weights (or GRPO ratios) below 1 − ε are clipped."""
    clip_high: float = 0.2
    """Upper clip ε: weights (or GRPO ratios) above 1 + ε are clipped."""
    truncate_at: float = 10.0
    """Truncated IS: weights are capped at this value (is_mode=truncate)."""
    clip_ratio_c: float | None = None
    """GRPO: dual clip (e.g. 3.0): a token with a negative advantage loses at most
    clip_ratio_c·|A|; null: off."""
    std_norm: bool = True
    """GRPO, REINFORCE and vargrad's group rewards: divide the group-centred rewards by the
    group's std (false: r − group mean only, Dr. GRPO's advantage)."""
    loss_agg: str = "seq-mean-token-mean"
    """GRPO: how token losses become the loss: seq-mean-token-mean (mean over each response's
    tokens, then over responses: GRPO), token-mean (every token of the step weighs the same:
    DAPO), seq-mean-token-sum-norm (each response's token sum divided by the constant
    norm_len: Dr. GRPO, no length bias)."""
    norm_len: int | None = None
    """GRPO, loss_agg=seq-mean-token-sum-norm: the constant divisor; null: the run uses
    generator.max_tokens."""
    kl_coef: float = 0.0
    """GRPO only: weight of the k3 KL penalty toward the reference policy."""
    truncated: str = "keep"
    """Responses cut at the length limit (finish reason "length"): keep (trained like
    finished ones), drop (no loss on them, DAPO's overlong filtering; they still count in
    their group's reward normalisation), zero_reward (reward 0, then shaped as usual)."""
    log_z_detach: bool = False
    """FlowRL: the log Z head reads the prompt's hidden states detached, so the policy trunk
    gets no gradient from it (false: the paper's, the head's gradient reaches the trunk)."""
    temperature: float | None = None
    """The temperature of the learner's log-probs; null: the actors' sampling temperature
    (generator.temperature), which the run fills in (1.0 for a learner built directly).
    Off-policy trajectory balance (``ignores_behavior``) may train at another temperature
    than its actors sample at (e.g. 1.0 on groups sampled at 1.5: exploration; its target
    is defined at this one); every other objective needs the two equal."""

    def ignores_behavior(self) -> bool:
        """Off-policy trajectory balance (flowrl or vargrad, raw rewards, is_mode=off): the
        loss never reads the behaviour log-probs and its fixed point is the target whatever
        policy sampled the data, so a group from any policy with full support (another
        temperature, older weights) is valid data for the same target. Not with group-
        normalised rewards (a group's shaped rewards depend on how likely its sampler was
        to be right) nor flowrl_no_z (its fixed point depends on where samples fall)."""
        return (self.name in ("flowrl", "vargrad") and self.reward_norm == "raw"
                and self.is_mode == "off")  # fmt: skip

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ValueError(f"algo.name={self.name!r}: expected one of {OBJECTIVES}")
        if self.is_level not in IS_LEVELS:
            raise ValueError(f"algo.is_level={self.is_level!r}: expected one of {IS_LEVELS}")
        if self.truncated not in TRUNCATED:
            raise ValueError(f"algo.truncated={self.truncated!r}: expected one of {TRUNCATED}")
        if self.residual not in RESIDUALS:
            raise ValueError(f"algo.residual={self.residual!r}: expected one of {RESIDUALS}")
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"algo.loss_agg={self.loss_agg!r}: expected one of {LOSS_AGGS}")
        if self.reward_norm not in REWARD_NORMS:
            raise ValueError(f"algo.reward_norm={self.reward_norm!r}: expected {REWARD_NORMS}")
