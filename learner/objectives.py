"""Policy objectives: FlowRL (trajectory balance), GRPO and REINFORCE, as pure tensor functions.

Shapes: B sequences, T response tokens. ``mask`` is bool or 0/1 and True on response tokens.
Invariants every function here keeps:
- padded positions (mask False) never influence a result or a gradient, whatever finite or
  non-finite value they hold (they are selected away with ``torch.where``, never multiplied);
- importance weights are detached: gradients flow only through the current policy's
  log-probs (and log Z), never through the weight itself;
- ``normalizer`` (default: B) is the number the summed per-sequence losses are divided by,
  so micro-batches of one optimizer step can all divide by the step's real sequence count.

Log-prob names say which policy they come from: ``logprobs`` (current policy, with grad),
``behavior_logprobs`` (recorded by the actor at sampling time), ``ref_logprobs`` (frozen
reference policy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from flowrl_async.learner.config import IS_MODES, LOSS_AGGS, RESIDUALS

# log importance ratios are clamped to ±MAX_LOG_RATIO before exp: weights stay within
# [2e-9, 4.9e8] and finite in float32 (exp overflows past ~88), whatever the gap
MAX_LOG_RATIO = 20.0


@dataclass(frozen=True)
class LossOutput:
    """A scalar loss to backpropagate and plain-float metrics to log."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t values[b, t] over response tokens -> [B]; padded entries are ignored."""
    mask = _as_bool(mask)
    return torch.where(mask, values, values.new_zeros(())).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over response tokens -> [B]; a sequence with no response tokens gives 0."""
    count = _as_bool(mask).sum(-1).clamp(min=1).to(values.dtype)
    return masked_sum(values, mask) / count


def group_normalized_rewards(
    rewards: torch.Tensor, group_ids: torch.Tensor | Sequence, eps: float = 1e-6,
    std: bool = True,
) -> torch.Tensor:  # fmt: skip
    """(r − group mean) / (group std + eps) per group -> [B] (``std=False``: r − group mean,
    Dr. GRPO's advantage).

    ``group_ids`` is a [B] integer tensor or any sequence of hashable ids (e.g. group uuids).
    The std is unbiased (torch.std's default); a group of one gives 0.
    """
    if not isinstance(group_ids, torch.Tensor):
        index: dict = {}
        group_ids = torch.tensor([index.setdefault(g, len(index)) for g in group_ids])
    if group_ids.shape != rewards.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards and group_ids must both be [B]; got {tuple(rewards.shape)} "
            f"and {tuple(group_ids.shape)}"
        )
    inverse, count, mean = _group_means(rewards, group_ids)
    zeros = torch.zeros_like(count)
    centered = rewards - mean[inverse]
    var = zeros.index_add(0, inverse, centered**2) / (count - 1).clamp(min=1)
    normalized = centered / (var.sqrt()[inverse] + eps) if std else centered
    return torch.where(count[inverse] > 1, normalized, torch.zeros_like(normalized))


def _group_means(values: torch.Tensor, group_ids: torch.Tensor):
    """-> (each row's group number [B], rows per group [G], mean of ``values`` per group [G])."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n = int(inverse.max()) + 1 if inverse.numel() else 0
    zeros = torch.zeros(n, dtype=values.dtype, device=values.device)
    count = zeros.index_add(0, inverse, torch.ones_like(values))
    return inverse, count, zeros.index_add(0, inverse, values) / count


def _check_mode(mode: str) -> None:
    if mode not in IS_MODES:
        raise ValueError(f"unknown importance-sampling mode {mode!r}; expected one of {IS_MODES}")


def sequence_log_ratio(
    logprobs: torch.Tensor, behavior_logprobs: torch.Tensor, mask: torch.Tensor,
    level: str = "sequence",
) -> torch.Tensor:  # fmt: skip
    """s_i = Σ_t (log π_θ − log μ) over response tokens (``level`` geometric: the mean over
    them), clamped to ±MAX_LOG_RATIO -> [B], detached."""
    gap = logprobs.detach() - behavior_logprobs.detach()
    if level not in ("sequence", "geometric"):
        raise ValueError(f"a sequence-level objective takes is_level sequence or geometric, "
                         f"not {level!r}")  # fmt: skip
    s = masked_sum(gap, mask) if level == "sequence" else masked_mean(gap, mask)
    return s.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)


def token_log_ratio(logprobs, behavior_logprobs, mask) -> torch.Tensor:
    """(log π_θ − log μ) per response token, clamped to ±MAX_LOG_RATIO -> [B, T], detached;
    0 on padding."""
    gap = torch.where(_as_bool(mask), logprobs.detach() - behavior_logprobs.detach(), 0.0)
    return gap.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)


def mismatch_metrics(logprobs, behavior_logprobs, mask) -> dict[str, float]:
    """How far the learner's log-probs are from the recorded ones on the sampled tokens:
    k3 = r − 1 − log r per token (r = π_θ/μ; ≥ 0, an estimate of KL(μ ‖ π_θ) from μ's
    samples), its mean over tokens, and χ² = mean_i(w_i²) − 1 of the sequence ratios."""
    m = _as_bool(mask)
    if not m.any():
        return {"mismatch_kl": 0.0, "is_chi2": 0.0}
    gap = token_log_ratio(logprobs, behavior_logprobs, mask).double()
    k3 = gap.exp() - 1 - gap
    s = sequence_log_ratio(logprobs, behavior_logprobs, mask).double()
    return {"mismatch_kl": float(k3[m].mean()), "is_chi2": float((2 * s).exp().mean() - 1)}


def _limit_weights(
    raw: torch.Tensor, mode: str, clip_low: float, clip_high: float, truncate_at: float,
    mask_low: float = 0.5, mask_high: float = 2.0,
) -> torch.Tensor:  # fmt: skip
    if mode == "mask":  # IcePop/MIS: out of [mask_low, mask_high] -> weight 0
        return torch.where((raw >= mask_low) & (raw <= mask_high), raw, torch.zeros_like(raw))
    if mode == "clip":
        return raw.clamp(1.0 - clip_low, 1.0 + clip_high)
    if mode == "truncate":
        return raw.clamp(max=truncate_at)
    if mode == "off":
        return torch.ones_like(raw)
    return raw


def _weights(logprobs, behavior_logprobs, mask, level: str, limits: tuple):
    """(log raw ratios, raw ratios, weights limited by ``limits``: _limit_weights's
    arguments) per token (``level`` token, [B, T]) or per sequence ([B]), detached."""
    if level == "token":
        log_raw = token_log_ratio(logprobs, behavior_logprobs, mask)
    else:
        log_raw = sequence_log_ratio(logprobs, behavior_logprobs, mask, level)
    raw = log_raw.exp()
    return log_raw, raw, _limit_weights(raw, *limits)


def sequence_importance_weights(
    logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "clip",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    truncate_at: float = 10.0,
) -> torch.Tensor:
    """w_i = exp(Σ_t mask·(logprobs − behavior_logprobs)) -> [B], detached.

    mode "clip" clamps to [1 − clip_low, 1 + clip_high] (the paper), "truncate" clamps above
    at ``truncate_at`` (truncated IS), "none" leaves the weight as it is (unbounded), "off"
    gives every sequence weight 1 (off-policy trajectory balance: TB's optimum does not
    depend on the behaviour policy, so no correction is needed).
    """
    _check_mode(mode)
    raw = sequence_log_ratio(logprobs, behavior_logprobs, mask).exp()
    return _limit_weights(raw, mode, clip_low, clip_high, truncate_at)


def residual(log_z: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
             mask: torch.Tensor, rewards: torch.Tensor, beta: float, form: str = "mean",
             token_weights: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The trajectory-balance residual δ [B] of ``form`` (with |y| the response length):

        mean          δ = log Z + mean_t log π − β r − mean_t log π_ref       (the paper)
        sum           δ = log Z + Σ_t log π − β r − Σ_t log π_ref              (true TB)
        sum_over_len  δ = (log Z + Σ_t log π − β r − Σ_t log π_ref) / |y|

    What δ = 0 for every y (full support) means, Z normalising:
        sum, sum_over_len:  π(y) = π_ref(y)·exp(β r(y)) / Z
        mean:               π(y) = π_ref(y)·exp(|y|·(β r(y) − c)), c fixed by normalisation
                            (the effective β grows with length; among equally rewarded
                            answers longer ones are favoured exponentially)

    ``token_weights`` [B, T] (detached; token-level IS): the policy term keeps its value but
    its gradient through token t is scaled by w_t, so ∂δ²/∂log π_t = 2δ·w_t·∂δ/∂log π_t
    (CISPO-style: a weight scales a token's gradient, it never drops it unless it is 0).
    -> (δ, the policy term, the reference term) as the form uses them."""
    if form not in RESIDUALS:
        raise ValueError(f"unknown residual form {form!r}; expected one of {RESIDUALS}")
    ref = ref_logprobs.detach()
    average = masked_mean if form == "mean" else masked_sum
    pol, ref_term = average(logprobs, mask), average(ref, mask)
    if token_weights is not None:  # value of pol, gradient Σ_t w_t ∂pol/∂log π_t
        weighted = average(token_weights.detach() * logprobs, mask)
        pol = pol.detach() + (weighted - weighted.detach())
    delta = log_z + pol - beta * rewards.detach() - ref_term
    if form == "sum_over_len":
        delta = delta / _as_bool(mask).sum(-1).clamp(min=1).to(delta.dtype)
    return delta, pol, ref_term


def importance_metrics(
    raw: torch.Tensor, weights: torch.Tensor, mode: str = "clip",
    log_raw: torch.Tensor | None = None,
) -> dict[str, float]:  # fmt: skip
    """IS weight mean, normalised effective sample size (Σw)²/(B·Σw²) of the raw weights
    (how far from the behaviour policy the batch is, reported even when weighting is off),
    computed in log space from ``log_raw`` (= log raw) so it stays finite, and the fraction
    of weights a clip or truncation changed."""
    if raw.numel() == 0:
        return {"is_weight_mean": 0.0, "is_ess": 0.0, "is_clip_fraction": 0.0,
                "is_masked_fraction": 0.0}  # fmt: skip
    s = raw.detach().double().log() if log_raw is None else log_raw.detach().double()
    ess = (2 * torch.logsumexp(s, 0) - torch.logsumexp(2 * s, 0)).exp() / s.numel()
    changed = weights.detach() != raw.detach()
    clipped = 0.0 if mode in ("off", "mask") else float(changed.double().mean())
    return {
        "is_weight_mean": float(weights.detach().double().mean()),
        "is_ess": float(ess),
        "is_clip_fraction": float(clipped),
        "is_masked_fraction": float(changed.double().mean()) if mode == "mask" else 0.0,
    }


def _divide(total: torch.Tensor, normalizer: float | None, batch: int) -> torch.Tensor:
    denom = float(batch if normalizer is None else normalizer)
    if denom <= 0:
        raise ValueError(f"loss normalizer must be positive, got {denom}")
    return total / denom


def flowrl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    mask: torch.Tensor,
    log_z: torch.Tensor,
    rewards: torch.Tensor,
    beta: float = 15.0,
    is_mode: str = "clip",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    truncate_at: float = 10.0,
    normalizer: float | None = None,
    form: str = "mean",
    level: str = "sequence",
    mask_low: float = 0.5,
    mask_high: float = 2.0,
) -> LossOutput:
    """FlowRL trajectory-balance loss.

    δ_i = ``residual`` of ``form`` (mean: log_z_i + mean_t(logprobs_i) − beta·rewards_i −
          mean_t(ref_logprobs_i), the paper's; sum; sum_over_len; see ``residual`` for
          each form's target)
    sequence / geometric ``level``: loss = Σ_i w_i·δ_i² / normalizer (normalizer defaults
          to B: the mean), w_i the sequence weight limited by ``is_mode``;
    token ``level`` (the FlowRL authors' later CISPO-style variant): loss = Σ_i δ_i² /
          normalizer with each token's gradient scaled by its own limited ratio w_it
          (``residual``'s token_weights): ∂loss/∂log π_it = 2·δ_i·w_it·∂δ_i/∂log π_it.

    logprobs, ref_logprobs, behavior_logprobs, mask: [B, T]; log_z, rewards: [B]. ``rewards``
    are used as given (normalise them first for the paper's setting).
    """
    _check_mode(is_mode)
    limits = (is_mode, clip_low, clip_high, truncate_at, mask_low, mask_high)
    log_raw, raw, weights = _weights(logprobs, behavior_logprobs, mask, level, limits)
    if level == "token":
        delta, _, _ = residual(log_z, logprobs, ref_logprobs, mask, rewards, beta, form,
                               weights)  # fmt: skip
        loss = _divide((delta**2).sum(), normalizer, logprobs.shape[0])
        m = _as_bool(mask)
        raw, weights, log_raw = raw[m], weights[m], log_raw[m]  # metrics: real tokens
    else:
        delta, _, _ = residual(log_z, logprobs, ref_logprobs, mask, rewards, beta, form)
        loss = _divide((weights * delta**2).sum(), normalizer, logprobs.shape[0])
    with torch.no_grad():
        metrics = {
            "delta_sq": float((delta**2).mean()),
            "log_z": float(log_z.mean()),
            "logprob_mean": float(masked_mean(logprobs.detach(), mask).mean()),
            "ref_logprob_mean": float(masked_mean(ref_logprobs.detach(), mask).mean()),
            **importance_metrics(raw, weights, is_mode, log_raw),
            **mismatch_metrics(logprobs, behavior_logprobs, mask),
        }
    return LossOutput(loss=loss, metrics=metrics)


def vargrad_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    beta: float = 15.0,
    normalizer: float | None = None,
    form: str = "sum_over_len",
) -> LossOutput:
    """Trajectory balance without a learned log Z (VarGrad, as in TBA). Per group,
    log Ẑ = −mean over its rows of δ₀, detached, with δ₀ = Σ_t log π − β r − Σ_t log π_ref
    (the mean form: with per-token means); then δ = δ₀ + log Ẑ, divided by |y| in the
    sum_over_len form; loss = Σ_i δ_i² / normalizer. Log Ẑ is estimated in the form whose
    residual it cancels, so sum and sum_over_len keep sum's target π ∝ π_ref·exp(β r).
    Every row of a group must be in the batch (a group of one gives δ = 0). No importance
    weights: the optimum does not depend on the sampler."""
    zeros = torch.zeros_like(rewards)
    base = "mean" if form == "mean" else "sum"
    delta0, _, _ = residual(zeros, logprobs, ref_logprobs, mask, rewards, beta, base)
    inverse, count, mean = _group_means(delta0.detach(), group_index)
    log_z_hat, n = -mean, count.numel()
    delta = delta0 + log_z_hat[inverse]
    if form == "sum_over_len":
        delta = delta / _as_bool(mask).sum(-1).clamp(min=1).to(delta.dtype)
    loss = _divide((delta**2).sum(), normalizer, logprobs.shape[0])
    with torch.no_grad():
        metrics = {
            "delta_sq": float((delta**2).mean()) if delta.numel() else 0.0,
            "log_z": float(log_z_hat.mean()) if n else 0.0,
            "logprob_mean": float(masked_mean(logprobs.detach(), mask).mean()),
            "ref_logprob_mean": float(masked_mean(ref_logprobs.detach(), mask).mean()),
        }
    return LossOutput(loss=loss, metrics=metrics)


def grpo_loss(
    logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    normalizer: float | None = None,
    clip_ratio_c: float | None = None,
    agg: str = "seq-mean-token-mean",
    norm_len: int | None = None,
) -> LossOutput:
    """GRPO: token-level clipped surrogate against the behaviour policy.

    ρ_t = exp(logprobs_t − behavior_logprobs_t)
    ℓ_it = −min(ρ_t·A_i, clip(ρ_t, 1 − clip_low, 1 + clip_high)·A_i)
           [+ kl_coef · k3(π_θ ‖ π_ref)_t when ref_logprobs are given]
    ``agg`` (how token losses become the loss; |y_i| the response length):
      seq-mean-token-mean      Σ_i mean_t ℓ_it / normalizer   (normalizer: sequences; GRPO)
      token-mean               Σ_i Σ_t ℓ_it / normalizer      (normalizer: the step's response
                               tokens, so every token weighs the same; DAPO)
      seq-mean-token-sum-norm  Σ_i (Σ_t ℓ_it / norm_len) / normalizer (normalizer: sequences,
                               norm_len a constant, e.g. the length limit; Dr. GRPO)
    (normalizer defaults to B; for token-mean to the batch's response tokens).

    ``clip_ratio_c`` (dual clip, > 1): for A < 0 the token's loss is at most c·|A|, i.e.
    ℓ_t = min(that surrogate, −c·A) where A < 0, bounding what one very off-policy token
    can contribute. ``advantages`` [B] are usually group-normalised rewards. The log-ratio is clamped to
    ±MAX_LOG_RATIO before exp, gradient included: a token past e^20 contributes no
    gradient (as a dual clip would bound it) instead of inf.
    """
    mask = _as_bool(mask)
    log_ratio = torch.where(mask, logprobs - behavior_logprobs.detach(), logprobs.new_zeros(()))
    ratio = log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()
    adv = advantages.detach()[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    token_loss = -torch.minimum(unclipped, clipped)
    if clip_ratio_c is not None:
        bounded = torch.minimum(token_loss, -clip_ratio_c * adv)
        token_loss = torch.where(adv < 0, bounded, token_loss)
    kl = torch.zeros(logprobs.shape[0], dtype=logprobs.dtype, device=logprobs.device)
    if ref_logprobs is not None and kl_coef:
        # k3 estimator of KL(π_θ ‖ π_ref): e^(ref − θ) − (ref − θ) − 1 >= 0.
        diff = torch.where(mask, ref_logprobs.detach() - logprobs, logprobs.new_zeros(()))
        k3 = diff.exp() - diff - 1.0
        kl = masked_mean(k3, mask)
        token_loss = token_loss + kl_coef * k3
    per_seq = aggregate(token_loss, mask, agg, norm_len)
    if normalizer is None and agg == "token-mean":  # alone, the batch's own token count
        normalizer = max(1, int(mask.sum()))
    loss = _divide(per_seq.sum(), normalizer, logprobs.shape[0])
    with torch.no_grad():
        n_tokens = mask.sum().clamp(min=1)
        was_clipped = (unclipped != clipped) & mask
        metrics = {
            "ratio_mean": float(torch.where(mask, ratio, 0.0).sum() / n_tokens),
            "clip_fraction": float(was_clipped.sum() / n_tokens),
            "kl_ref": float(kl.mean()) if kl.numel() else 0.0,
            "advantage_mean": float(advantages.mean()) if advantages.numel() else 0.0,
        }
    return LossOutput(loss=loss, metrics=metrics)


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, agg: str,
              norm_len: int | None = None) -> torch.Tensor:  # fmt: skip
    """[B, T] token losses -> [B] per-sequence terms of ``agg`` (see ``grpo_loss``); the
    caller divides their sum by sequences (token-mean: by response tokens)."""
    if agg == "seq-mean-token-mean":
        return masked_mean(token_loss, mask)
    if agg == "token-mean":
        return masked_sum(token_loss, mask)
    if agg == "seq-mean-token-sum-norm":
        if not norm_len or norm_len < 1:
            raise ValueError("loss aggregation seq-mean-token-sum-norm needs norm_len >= 1 "
                             "(algo.norm_len; the run sets it to generator.max_tokens)")  # fmt: skip
        return masked_sum(token_loss, mask) / norm_len
    raise ValueError(f"unknown loss aggregation {agg!r}; expected one of {LOSS_AGGS}")


def reinforce_loss(
    logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    is_mode: str = "truncate",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    truncate_at: float = 10.0,
    normalizer: float | None = None,
    level: str = "sequence",
    mask_low: float = 0.5,
    mask_high: float = 2.0,
) -> LossOutput:
    """REINFORCE with a baseline and importance weights.

    sequence / geometric ``level``: loss = −Σ_i w_i·A_i·Σ_t logprobs_it / normalizer;
    token: loss = −Σ_i A_i·Σ_t w_it·logprobs_it / normalizer, w_it = exp(log π_θ − log μ)
    of token t; weights detached and limited by ``is_mode``; A_i baseline-subtracted rewards.
    """
    _check_mode(is_mode)
    limits = (is_mode, clip_low, clip_high, truncate_at, mask_low, mask_high)
    adv = advantages.detach()
    log_raw, raw, weights = _weights(logprobs, behavior_logprobs, mask, level, limits)
    if level == "token":
        per_seq = -adv * masked_sum(weights * logprobs, mask)
        m = _as_bool(mask)
        raw, weights, log_raw = raw[m], weights[m], log_raw[m]  # the metrics: real tokens
    else:
        per_seq = -weights * adv * masked_sum(logprobs, mask)
    loss = _divide(per_seq.sum(), normalizer, logprobs.shape[0])
    metrics = importance_metrics(raw, weights, is_mode, log_raw)
    metrics.update(mismatch_metrics(logprobs, behavior_logprobs, mask))
    metrics["advantage_mean"] = float(advantages.mean()) if advantages.numel() else 0.0
    return LossOutput(loss=loss, metrics=metrics)
