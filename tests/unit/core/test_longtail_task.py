"""The long-tail task: heavy-tailed answer lengths, exact 0/1 verdicts."""

import random

import pytest

from flowrl_async.tasks.longtail import LongTailTask, Prompt, quantile_counts


def test_counts_are_the_quantiles_of_the_power_law():
    # alpha 1 on [1, 4]: weights 1, 1/2, 1/3, 1/4 (sum 25/12) -> P = .48, .24, .16, .12,
    # cumulative .48, .72, .88, 1; quantiles (i + .5)/4 = .125, .375, .625, .875 -> 1, 1, 2, 3
    assert quantile_counts(4, 4, 1.0) == [1, 1, 2, 3]
    counts = quantile_counts(64, 96, 1.2)
    assert counts == sorted(counts) and counts[0] == 1
    # a long tail: the median answer is short, the longest ones far longer
    assert counts[32] <= 4 and counts[-1] >= 20 * counts[32]


def test_verdicts_and_the_valid_set_agree():
    task = LongTailTask(prompts=8, max_count=16)
    p = Prompt(0, "dots 3:", 3)
    assert task.verify(p, " ... ").info == "ok" and task.verify(p, "...").reward == 1.0
    assert [task.verify(p, s).info for s in ("", "..", "....", "..x")] == [
        "empty", "wrong count", "wrong count", "malformed"]  # fmt: skip
    assert task.valid_set(p) == ("...",)
    assert len(task.train_prompts) + len(task.eval_prompts) == 8 and len(task.eval_prompts) == 2
    rng = random.Random(0)
    lengths = [len(task.format_example(p, rng)) for _ in range(2000)]
    assert set("".join(task.format_example(p, rng) for _ in range(5))) == {"."}
    assert 1 <= min(lengths) and max(lengths) <= 16 and lengths.count(1) > lengths.count(16)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="alpha > 0"):
        LongTailTask(alpha=0)
