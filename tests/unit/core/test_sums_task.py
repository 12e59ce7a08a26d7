"""The variable-length built-in task: s as a sum of digits 1–9."""

import pickle
import random

import pytest

from flowrl_async.tasks.sums import DigitPartsTask, Prompt, valid_answers


def test_the_valid_set_is_every_composition_into_digits():
    assert valid_answers(1) == ("1",)
    assert valid_answers(3) == ("1+1+1", "1+2", "2+1", "3")
    for s in range(1, 10):
        answers = valid_answers(s)
        assert len(answers) == 2 ** (s - 1) == len(set(answers))
        assert {len(a) for a in answers} == set(range(1, 2 * s, 2))  # 1 .. 2s - 1 characters
    assert len(valid_answers(10)) == 2**9 - 1  # "10" is not a digit


@pytest.mark.parametrize(
    "completion, reward, info",
    [
        ("2+3", 1.0, "ok"), (" 5 \n", 1.0, "ok"), ("1+1+1+1+1", 1.0, "ok"),
        ("2+2", 0.0, "wrong sum"), ("5+0", 0.0, "malformed"), ("0+5", 0.0, "malformed"),
        ("2++3", 0.0, "malformed"), ("+5", 0.0, "malformed"), ("23", 0.0, "malformed"),
        ("", 0.0, "empty"), ("２+３", 0.0, "malformed"),
    ],
)  # fmt: skip
def test_verify(completion, reward, info):
    v = DigitPartsTask().verify(Prompt(0, "add to 5:", 5), completion)
    assert (v.reward, v.info) == (reward, info)


def test_verify_agrees_with_the_valid_set_on_every_short_string():
    import itertools

    task, prompt = DigitPartsTask(), Prompt(0, "add to 4:", 4)
    # every string of up to 7 characters (the longest answer, "1+1+1+1") over the digits
    # an answer may use, a zero, a digit too big, and '+'
    ok = {"".join(c) for n in range(8) for c in itertools.product("01234+9", repeat=n)
          if task.verify(prompt, "".join(c)).info == "ok"}  # fmt: skip
    assert ok == set(valid_answers(4))


def test_prompts_split_and_stay_stable():
    task = DigitPartsTask(totals=tuple(range(2, 10)), held_out_fraction=0.25, seed=3)
    ids = sorted(p.prompt_id for p in task.train_prompts + task.eval_prompts)
    assert ids == list(range(8)) and len(task.eval_prompts) == 2
    again = DigitPartsTask(totals=tuple(range(2, 10)), held_out_fraction=0.25, seed=3)
    assert [p.text for p in again.eval_prompts] == [p.text for p in task.eval_prompts]
    p = task.train_prompts[0]
    assert pickle.loads(pickle.dumps(p)) == p and p.text == f"add to {p.total}:"
    with pytest.raises(ValueError, match="totals"):
        DigitPartsTask(totals=(0,))


def test_format_examples_are_well_formed():
    task, rng = DigitPartsTask(), random.Random(0)
    prompt = Prompt(0, "add to 6:", 6)
    examples = [task.format_example(prompt, rng) for _ in range(200)]
    assert all(task.verify(prompt, e).info in ("ok", "wrong sum") for e in examples)
    assert len({len(e) for e in examples}) >= 5  # lengths vary
