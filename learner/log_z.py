"""The log Z head: a learned log-partition function log Z_φ(x) per prompt.

It reads the policy's last hidden states, averages them over ALL prompt tokens (the
reference implementation drops the last one; this one does not), and maps the mean through
Linear–GELU–LayerNorm blocks and a final Linear→1. It lives on the learner only and is never
sent to actors. Padded prompt positions (mask False) never influence the result.
"""

from __future__ import annotations

import torch
from torch import nn


class LogZHead(nn.Module):
    """The learned log partition function log Z(x) on the prompt's hidden states."""

    def __init__(self, hidden_size: int, width: int = 256, n_blocks: int = 2, init: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        size = hidden_size
        for _ in range(n_blocks):
            layers += [nn.Linear(size, width), nn.GELU(), nn.LayerNorm(width)]
            size = width
        self.blocks = nn.Sequential(*layers)
        self.out = nn.Linear(size, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, init)

    @staticmethod
    def pool(hidden_states: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Mean of hidden_states [B, P, H] over positions where prompt_mask [B, P] is set."""
        mask = prompt_mask.bool()
        summed = torch.where(mask[..., None], hidden_states, hidden_states.new_zeros(())).sum(1)
        count = mask.sum(1, keepdim=True).clamp(min=1).to(hidden_states.dtype)
        return summed / count

    def forward(self, hidden_states: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """hidden_states [B, P, H], prompt_mask [B, P] -> log Z [B]."""
        pooled = self.pool(hidden_states, prompt_mask).to(self.out.weight.dtype)
        return self.out(self.blocks(pooled)).squeeze(-1)
