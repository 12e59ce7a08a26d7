"""Small valid records and data files for tests."""

import json
from pathlib import Path

import numpy as np

from flowrl_async.records import Group, Response, SamplingParams


def make_group(
    group_id="g1", n=2, tokens=3, version=0, rewards=None, actor_id=0, prompt_id=7, cursor=-1
) -> Group:
    rewards = rewards if rewards is not None else [float(i % 2) for i in range(n)]
    return Group(
        group_id=group_id,
        prompt_id=prompt_id,
        prompt_token_ids=np.array([1, 20, 21], dtype=np.int32),
        task="digits",
        responses=tuple(
            Response(
                token_ids=np.arange(10, 10 + tokens, dtype=np.int32) + i,
                behavior_logprobs=np.full(tokens, -0.5 - i, dtype=np.float32),
                reward=rewards[i],
                finish_reason="stop",
                first_version=version,
                last_version=version,
                info="ok",
            )
            for i in range(n)
        ),
        actor_id=actor_id,
        cursor=cursor,
        sampling=SamplingParams(temperature=1.0, top_p=1.0, max_tokens=8, n=n),
        created_at=100.0,
        finished_at=101.5,
    )


def write_jsonl(path: Path, rows) -> Path:
    """One line per row: a str as it is (for malformed lines), anything else as JSON."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
