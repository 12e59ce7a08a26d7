"""Collating whole groups into training tensors, and the policy forward pass over them.

Layout of one row: ``[pad … pad, prompt][response, pad … pad]``: prompts left-padded to a
common width P, responses right-padded to a common width T. The logits at positions
P−1 … P+T−2 predict the response tokens. Positions count only real tokens, so padding
never shifts a token's position.

Invariants: rows of one group are contiguous; ``behavior_logprobs`` are exactly the ones the
actor recorded (never recomputed); padded entries are masked and hold zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flowrl_async.learner.logprobs import token_logprobs
from flowrl_async.records import Group


@dataclass
class TrainBatch:
    """Whole groups collated into padded tensors, one row per response."""

    input_ids: torch.Tensor  # [N, P+T]
    attention_mask: torch.Tensor  # [N, P+T]
    prompt_width: int  # P
    response_mask: torch.Tensor  # [N, T] bool
    behavior_logprobs: torch.Tensor  # [N, T] float32
    rewards: torch.Tensor  # [N] float32, raw
    correct: torch.Tensor  # [N] bool, the verifier said "ok"
    group_index: torch.Tensor  # [N] int64, which group a row belongs to
    staleness: torch.Tensor  # [N] int64
    version: torch.Tensor  # [N] int64, first version of the response

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def prompt_mask(self) -> torch.Tensor:
        return self.attention_mask[:, : self.prompt_width].bool()

    def select(self, rows: list[int]) -> TrainBatch:
        """The given rows, with the padding no selected row needs trimmed off both sides."""
        index = torch.as_tensor(rows, dtype=torch.long)
        p = int(self.attention_mask[index, : self.prompt_width].sum(1).max())
        t = max(1, int(self.response_mask[index].sum(1).max()))
        cols = slice(self.prompt_width - p, self.prompt_width + t)
        return TrainBatch(
            self.input_ids[index, cols],
            self.attention_mask[index, cols],
            p,
            self.response_mask[index, :t],
            self.behavior_logprobs[index, :t],
            self.rewards[index],
            self.correct[index],
            self.group_index[index],
            self.staleness[index],
            self.version[index],
        )

    def rows(self, index: slice) -> TrainBatch:
        return TrainBatch(
            self.input_ids[index],
            self.attention_mask[index],
            self.prompt_width,
            self.response_mask[index],
            self.behavior_logprobs[index],
            self.rewards[index],
            self.correct[index],
            self.group_index[index],
            self.staleness[index],
            self.version[index],
        )

    def to(self, device: str) -> TrainBatch:
        fields = {k: v.to(device) if torch.is_tensor(v) else v for k, v in vars(self).items()}
        return TrainBatch(**fields)


def micro_batches(
    batch: TrainBatch, max_rows: int, max_tokens: int | None = None, whole_groups: bool = False
) -> list[list[int]]:
    """Row indices of each micro-batch. Without a token budget: consecutive runs of
    ``max_rows``. With one: rows longest first, packed greedily while rows × the longest
    row's prompt + response tokens (what the padded micro-batch holds) stays within
    ``max_tokens``, at most ``max_rows`` rows; a row longer than the budget goes alone.
    ``whole_groups``: the same limits over whole groups (a group larger than them alone),
    for losses that need every row of a group at once."""
    if whole_groups:
        return _whole_group_batches(batch, max_rows, max_tokens)
    n = len(batch)
    if max_tokens is None:
        return [list(range(s, min(s + max_rows, n))) for s in range(0, n, max_rows)]
    prompt = batch.attention_mask[:, : batch.prompt_width].sum(1)
    response = batch.response_mask.sum(1)
    lengths = (prompt + response).tolist()
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    widest_p = widest_t = 0
    for i in order:
        p, t = int(prompt[i]), max(1, int(response[i]))
        if out:
            wp, wt = max(widest_p, p), max(widest_t, t)
            if len(out[-1]) < max_rows and (len(out[-1]) + 1) * (wp + wt) <= max_tokens:
                out[-1].append(i)
                widest_p, widest_t = wp, wt
                continue
        out.append([i])
        widest_p, widest_t = p, t
    return out


def _whole_group_batches(batch: TrainBatch, max_rows: int, max_tokens: int | None):
    # a padded micro-batch holds rows × (longest prompt + longest response)
    prompt = batch.attention_mask[:, : batch.prompt_width].sum(1).tolist()
    response = batch.response_mask.sum(1).clamp(min=1).tolist()
    index = batch.group_index.tolist()
    groups: list[list[int]] = []
    for row, g in enumerate(index):
        if groups and index[groups[-1][0]] == g:
            groups[-1].append(row)
        else:
            groups.append([row])
    out: list[list[int]] = []
    for rows in groups:
        if out:
            merged = out[-1] + rows
            widest = max(prompt[r] for r in merged) + max(response[r] for r in merged)
            fits = len(merged) <= max_rows and (
                max_tokens is None or len(merged) * widest <= max_tokens
            )
            if fits:
                out[-1] = merged
                continue
        out.append(list(rows))
    return out


def collate(groups: list[Group], staleness: list[int], pad_token_id: int) -> TrainBatch:
    rows = [(g, i, r) for i, g in enumerate(groups) for r in g.responses]
    width_p = max(len(g.prompt_token_ids) for g in groups)
    width_t = max(1, max(len(r.token_ids) for _, _, r in rows))
    n = len(rows)
    input_ids = torch.full((n, width_p + width_t), pad_token_id, dtype=torch.long)
    attention = torch.zeros((n, width_p + width_t), dtype=torch.long)
    response_mask = torch.zeros((n, width_t), dtype=torch.bool)
    behavior = torch.zeros((n, width_t), dtype=torch.float32)
    for row, (g, _, r) in enumerate(rows):
        p, t = len(g.prompt_token_ids), len(r.token_ids)
        input_ids[row, width_p - p : width_p] = torch.from_numpy(g.prompt_token_ids.astype("int64"))
        input_ids[row, width_p : width_p + t] = torch.from_numpy(r.token_ids.astype("int64"))
        attention[row, width_p - p : width_p + t] = 1
        response_mask[row, :t] = True
        behavior[row, :t] = torch.from_numpy(r.behavior_logprobs.copy())
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention,
        prompt_width=width_p,
        response_mask=response_mask,
        behavior_logprobs=behavior,
        rewards=torch.tensor([r.reward for _, _, r in rows], dtype=torch.float32),
        correct=torch.tensor([r.info == "ok" for _, _, r in rows], dtype=torch.bool),
        group_index=torch.tensor([i for _, i, _ in rows], dtype=torch.long),
        staleness=torch.tensor([staleness[i] for _, i, _ in rows], dtype=torch.long),
        version=torch.tensor([r.first_version for _, _, r in rows], dtype=torch.long),
    )


@dataclass
class PolicyOutput:
    """One forward pass: token log-probs, entropy and (optionally) hidden states."""

    logprobs: torch.Tensor  # [N, T] log π(response token) at the given temperature
    entropy: torch.Tensor  # [N, T] entropy of that distribution (no grad)
    hidden: torch.Tensor | None  # [N, P, H] last hidden states over the prompt


class PolicyForward(nn.Module):
    """A causal LM's forward as the learner needs it: the response tokens' log-probs (and
    entropy) and the prompt's last hidden states. The decoder runs once, the output layer
    only over the response positions, ``chunk`` positions at a time (``logprobs.py``), so
    [N, T, V] logits never exist at once. Sharded, it is FSDP2's root unit."""

    def __init__(self, model):
        super().__init__()
        if getattr(model.config, "final_logit_softcapping", None):
            raise NotImplementedError("models with logit soft-capping (e.g. Gemma 2)")
        self.model = model

    def forward(self, batch: TrainBatch, temperature: float, want_hidden: bool,
                chunk: int | None = 1024) -> PolicyOutput:  # fmt: skip
        model = self.model
        position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = getattr(model, model.base_model_prefix)(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state  # [N, P+T, H], after the final norm
        p, t = batch.prompt_width, batch.response_mask.shape[1]
        head = model.get_output_embeddings()
        targets = batch.input_ids[:, p : p + t]
        logprobs, entropy = token_logprobs(
            hidden[:, p - 1 : p + t - 1], head.weight, head.bias, targets, temperature, chunk
        )
        prompt_hidden = hidden[:, :p].float() if want_hidden else None  # log Z pools in fp32
        return PolicyOutput(logprobs, entropy, prompt_hidden)


def forward(model, batch: TrainBatch, temperature: float, want_hidden: bool,
            chunk: int | None = 1024) -> PolicyOutput:  # fmt: skip
    """``PolicyForward`` of an unsharded model."""
    return PolicyForward(model)(batch, temperature, want_hidden, chunk)


def probe_batch(token_ids) -> TrainBatch:
    """The weight-load probe as a one-row batch: its first token the prompt, the rest the
    response (the sum of the response's log-probs at temperature 1 is the probe)."""
    ids = torch.tensor([list(token_ids)], dtype=torch.long)
    t = ids.shape[1] - 1
    zeros = torch.zeros(1, dtype=torch.long)
    return TrainBatch(ids, torch.ones_like(ids), 1, torch.ones(1, t, dtype=torch.bool),
                      torch.zeros(1, t), torch.zeros(1), torch.zeros(1, dtype=torch.bool),
                      zeros, zeros, zeros)  # fmt: skip
