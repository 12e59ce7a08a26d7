"""Supervised warm-start: teach the format, not the solution.

Real RL starts from a pretrained model that already writes well-formed answers; the tiny
model starts from noise, so it is first fine-tuned on (prompt, well-formed answer + <eos>)
pairs from the task's ``format_example`` (for the digit task: k random digits, right or
wrong). Only response tokens carry loss.
"""

from __future__ import annotations

import random

import torch


def warm_start(
    model,
    tokenizer,
    task,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
) -> list[float]:
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    prompts = task.train_prompts
    for _ in range(steps):
        rows, targets = [], []
        for prompt in (rng.choice(prompts) for _ in range(batch_size)):
            p_ids = tokenizer(prompt.text)["input_ids"]
            a_ids = tokenizer(task.format_example(prompt, rng), add_special_tokens=False)[
                "input_ids"
            ] + [tokenizer.eos_token_id]
            rows.append(p_ids + a_ids)
            targets.append([-100] * len(p_ids) + a_ids)
        width = max(map(len, rows))
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        labels = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
        attention = (labels != -100) | (
            torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]
        )
        loss = model(input_ids=ids, attention_mask=attention.long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses
