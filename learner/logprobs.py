"""Token log-probs and entropy from the last hidden states, without ever holding the
[rows, T, V] logits: the output layer runs over chunks of positions, each chunk recomputed in
backward (``torch.utils.checkpoint``), so the vocabulary term's peak is O(chunk × V) whatever
T is. Logits are computed in float32 whatever the model's dtype.

    logits_c   = (h_c · Wᵀ + b) / temperature                     one chunk c of positions
    log π(y_t) = logits_c[t, y_t] − logsumexp(logits_c[t])
    H_t        = logsumexp(logits_c[t]) − Σ_v softmax(logits_c[t])_v · logits_c[t, v]   (no grad)

``chunk=None`` (or ≥ the number of positions) is the unchunked computation, kept as the
reference the chunked one must equal.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    targets: torch.Tensor, temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """hidden [M, H], targets [M] -> (log π of the targets [M], entropy [M], detached)."""
    with torch.autocast(hidden.device.type, enabled=False):  # float32 under autocast too
        logits = hidden.float() @ weight.float().t()  # the chunk's one [M, V] tensor
        if bias is not None:
            logits += bias.float()  # in place: the product's backward needs only its inputs
        logits /= temperature
        lse = torch.logsumexp(logits, -1)
        taken = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
        with torch.no_grad():  # Σ_v p_v·logit_v as [M, 1, V] × [M, V, 1]: no 3rd [M, V]
            p = torch.softmax(logits, -1)
            entropy = lse - torch.bmm(p.unsqueeze(1), logits.unsqueeze(-1)).view(-1)
    return taken, entropy


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    targets: torch.Tensor, temperature: float = 1.0, chunk: int | None = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """hidden [N, T, H] (the states that predict ``targets`` [N, T]), the output layer's
    weight [V, H] and bias [V] | None -> (log-probs [N, T] with gradient, entropy [N, T]
    without). ``chunk``: positions per output-layer pass (None: all at once)."""
    n, t, h = hidden.shape
    flat, flat_targets = hidden.reshape(n * t, h), targets.reshape(n * t)
    with torch.autocast(hidden.device.type, enabled=False):  # one float32 copy (none if fp32)
        weight = weight.float()
        bias = None if bias is None else bias.float()
    if chunk is None or chunk >= n * t:
        taken, entropy = _chunk_logprobs(flat, weight, bias, flat_targets, temperature)
        return taken.view(n, t), entropy.view(n, t)
    taken, entropy = [], []
    for start in range(0, n * t, chunk):
        rows = slice(start, start + chunk)
        args = (flat[rows], weight, bias, flat_targets[rows], temperature)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        taken.append(lp)
        entropy.append(ent)
    return torch.cat(taken).view(n, t), torch.cat(entropy).view(n, t)
