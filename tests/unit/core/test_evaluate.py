"""Evaluation metrics on hand-worked cases, the digit task's enumeration, and the eval CLI."""

import itertools
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from flowrl_async.model import build_tiny_model
from flowrl_async.run.evaluate import resolve_model_dir
from flowrl_async.tasks.digits import DigitSumTask, valid_answers
from flowrl_async.tasks.scoring import distribution_metrics, pass_at_k


def test_pass_at_k_unbiased_estimator():
    # n = 4 samples, c = 1 correct: pass@1 = 1 − C(3,1)/C(4,1) = 1 − 3/4 = 0.25
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25, abs=1e-12)
    # pass@2 = 1 − C(3,2)/C(4,2) = 1 − 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5, abs=1e-12)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(5, 3, 3) == 1.0  # n − c = 2 < k = 3: every 3-subset has a correct one
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_distribution_metrics_hand_worked():
    valid = ("04", "13", "22", "31", "40")
    # correct answers 13, 13, 22, 40 (+ one invalid "99" that is ignored):
    # coverage 3/5; empirical 0.5, 0.25, 0.25 on 13, 22, 40; uniform 0.2 each
    # TV = 0.5·(|0 − .2| + |.5 − .2| + |.25 − .2| + |0 − .2| + |.25 − .2|) = 0.5·0.8 = 0.4
    # entropy = −(0.5 ln 0.5 + 2·0.25 ln 0.25) = 1.5 ln 2
    m = distribution_metrics(["13", "13", "22", "40", "99"], valid)
    assert m["coverage"] == pytest.approx(0.6, abs=1e-12)
    assert m["tv_to_uniform"] == pytest.approx(0.4, abs=1e-12)
    assert m["entropy"] == pytest.approx(1.5 * math.log(2), abs=1e-12)
    assert distribution_metrics([], valid) == {
        "coverage": 0.0,
        "tv_to_uniform": 1.0,
        "entropy": 0.0,
    }


def test_digit_task_verifier_and_enumeration_agree_everywhere():
    task = DigitSumTask(lengths=(2, 3), min_solutions=1)
    for prompt in task.train_prompts + task.eval_prompts:
        valid = set(task.valid_set(prompt))
        for digits in itertools.product("0123456789", repeat=prompt.length):
            answer = "".join(digits)
            assert (task.verify(prompt, answer).info == "ok") == (answer in valid), (prompt, answer)
    # counts: 2 digits summing to 9 -> 10 ways; 3 digits summing to 13 -> 75 ways
    assert len(valid_answers(9, 2)) == 10 and len(valid_answers(13, 3)) == 75


@pytest.mark.parametrize(
    "completion, info, reward",
    [
        (" 04 ", "ok", 1.0),
        ("", "empty", 0.0),
        ("4a", "not digits", 0.0),
        ("004", "wrong length", 0.0),
        ("05", "wrong sum", 0.25),
        ("07", "wrong sum", 0.0625),
        ("٤٠", "not digits", 0.0),
    ],  # Arabic-Indic digits are not ASCII digits
)
def test_digit_task_verdicts(completion, info, reward):
    # partial credit 0.5·2^(−miss): "05" misses sum 4 by 1 -> 0.25; "07" by 3 -> 0.0625
    task = DigitSumTask(lengths=(2,), min_solutions=1, partial_credit=0.5)
    prompt = next(p for p in task.train_prompts + task.eval_prompts if p.total == 4)
    v = task.verify(prompt, completion)
    assert (v.info, v.reward) == (info, pytest.approx(reward, abs=1e-12))


def test_resolve_model_dir(tmp_path):
    model = build_tiny_model(tmp_path / "run" / "final_policy")
    (tmp_path / "run" / "config.json").write_text("{}")  # a run dir is not a model dir
    assert resolve_model_dir(tmp_path / "run") == model
    assert resolve_model_dir(model) == model
    with pytest.raises(FileNotFoundError):
        resolve_model_dir(tmp_path / "nothing")


def test_eval_cli_writes_samples_and_metrics(tmp_path):
    model = build_tiny_model(tmp_path / "m")
    # the run it belongs to trained the mean residual form: eval measures that target
    (model / "run_config.json").write_text(
        json.dumps({"algo": {"name": "flowrl", "residual": "mean", "beta": 2.0},
                    "generator": {"temperature": 1.0}})
    )  # fmt: skip
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowrl_async",
            "eval",
            f"checkpoint={model}",
            "engine=torch",
            "samples=4",
            f"out_dir={out}",
            "split=train",
            f"reference={model}",  # π_ref = the model itself: tv_to_target is reported
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "eval.json").read_text())
    lines = (out / "samples.jsonl").read_text().splitlines()
    task = DigitSumTask(lengths=(2,), min_solutions=5, partial_credit=0.5)  # configs/task
    assert metrics["prompts"] == len(task.train_prompts)
    assert len(lines) == 4 * len(task.train_prompts)
    rows = [json.loads(x) for x in lines]
    assert sum(r["info"] == "ok" for r in rows) / len(rows) == pytest.approx(metrics["accuracy"])
    assert 0.0 <= metrics["tv_to_target"] <= 1.0
    assert all("tv_to_target" in row for row in metrics["per_prompt"])
    assert "target: the mean residual form's, beta 2.0" in result.stdout
    # the digits task's valid answers share one length: the mean target is the TB target
    for row in metrics["per_prompt"]:
        assert row["tv_to_target"] == pytest.approx(row["tv_to_tb_target"], abs=1e-9)


def test_tv_to_target_hand_worked():
    valid = ("04", "13", "22", "31", "40")
    target = [0.1, 0.4, 0.2, 0.2, 0.1]
    # empirical 0.5, 0.25, 0.25 on 13, 22, 40:
    # TV = 0.5·(|0 − .1| + |.5 − .4| + |.25 − .2| + |0 − .2| + |.25 − .1|) = 0.5·0.6 = 0.3
    m = distribution_metrics(["13", "13", "22", "40", "99"], valid, target)
    assert m["tv_to_target"] == pytest.approx(0.3, abs=1e-12)
    assert distribution_metrics([], valid, target)["tv_to_target"] == 1.0
    assert "tv_to_target" not in distribution_metrics(["13"], valid)


def test_reference_target_is_pi_ref_renormalised_over_the_valid_set(tmp_path):
    import torch

    from flowrl_async.model import load_policy, load_tokenizer
    from flowrl_async.tasks.target import Reference, reference_target

    path = build_tiny_model(tmp_path / "m", seed=3)
    model, tok = load_policy(path), load_tokenizer(path)
    task = DigitSumTask(lengths=(2,), min_solutions=5, partial_credit=0.5)
    prompt = task.train_prompts[0]
    valid = task.valid_set(prompt)
    got = reference_target(Reference(model, tok), task, prompt, valid)
    # independently: π_ref(y + <eos> | x) by one teacher-forced pass per answer
    ids0 = tok(prompt.text)["input_ids"]
    probs = []
    for y in valid:
        ids = ids0 + tok(y, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
        probs.append(math.exp(sum(float(logp[t - 1, ids[t]]) for t in range(len(ids0), len(ids)))))
    expected = [p / sum(probs) for p in probs]
    assert sum(got) == pytest.approx(1.0, abs=1e-9)
    assert got == pytest.approx(expected, rel=1e-4)
    # every valid answer has one length and one reward: the mean form's target (which draws
    # π_ref for its normaliser) is the same distribution, whatever c comes out
    from flowrl_async.run.evaluate import reference_draws

    draw = reference_draws(model, tok, 64, 1.0, 8)
    mean = reference_target(Reference(model, tok, "mean", 3.0, draw=draw), task, prompt, valid)
    assert mean == pytest.approx(got, rel=1e-9)


def test_mean_form_target_across_lengths_hand_worked():
    from flowrl_async.tasks.target import target_probs

    # valid answers A (π_ref 0.1, 2 tokens) and B (π_ref 0.1, 3 tokens), reward 1, β = 1;
    # of 10 draws of π_ref, 8 were 1-token responses of reward 0 (mass 0.8 by estimate).
    # mean form: u = e^(−c) solves 0.1·e²·u² + 0.1·e³·u³ + 0.8·u = 1, i.e.
    # 2.0086·u³ + 0.7389·u² + 0.8·u − 1 = 0: f(0.550) = −0.0023, f(0.551) = +0.0011, so
    # u ≈ 0.55067; then p_B / p_A = e^(3(1−c)) / e^(2(1−c)) = e·u ≈ 1.497
    lp = math.log(0.1)
    p_a, p_b = target_probs([lp, lp], [2, 3], [1.0, 1.0], "mean", 1.0, [(1, 0.0)] * 8, 10)
    u = p_b / p_a / math.e
    cubic = 0.1 * math.e**2 * u**2 + 0.1 * math.e**3 * u**3 + 0.8 * u - 1
    assert abs(cubic) < 1e-9 and u == pytest.approx(0.55067, abs=1e-4)
    assert p_a + p_b == pytest.approx(1.0, abs=1e-12)
    # the sum forms: π_ref·exp(β r) restricted: 0.5 each, lengths do not matter
    for form in ("sum", "sum_over_len"):
        assert target_probs([lp, lp], [2, 3], [1.0, 1.0], form, 1.0) == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="needs samples"):
        target_probs([lp], [2], [1.0], "mean", 1.0)


def test_the_target_eval_measures_is_the_runs_objectives():
    from types import SimpleNamespace

    from flowrl_async.run.evaluate import target_of

    unset = SimpleNamespace(residual=None, beta=None)
    run = lambda name, **algo: {"algo": {"name": name, **algo}, "generator": {"temperature": 0.7}}  # noqa: E731
    assert target_of(run("flowrl", residual="mean", beta=15.0), unset) == ("mean", 15.0, 0.7)
    assert target_of(run("vargrad", residual="sum_over_len", beta=3.0), unset)[:2] == (
        "sum_over_len", 3.0)  # fmt: skip
    assert target_of(run("flowrl_no_z", residual="mean"), unset)[0] == "mean"
    assert target_of(run("grpo"), unset)[0] == "sum"  # no target of its own: TB's
    assert target_of(run("flowrl", residual="mean", temperature=0.5), unset)[2] == 0.5
    assert target_of(None, unset) == ("sum", 1.0, 1.0)  # a bare model directory
    override = SimpleNamespace(residual="sum", beta=2.0)
    assert target_of(run("flowrl", residual="mean", beta=15.0), override) == ("sum", 2.0, 0.7)


def test_the_mean_forms_draws_count_only_responses_outside_the_exact_valid_set():
    import numpy as np

    from flowrl_async.actors.generator import Completion
    from flowrl_async.model import load_tokenizer
    from flowrl_async.tasks.target import Reference, draw_others

    path = build_tiny_model(Path(tempfile.mkdtemp()) / "m", seed=3)
    tok = load_tokenizer(path)
    task = DigitSumTask(lengths=(2,), min_solutions=5, partial_credit=0.5)
    prompt = task.train_prompts[0]
    valid = task.valid_set(prompt)
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    exact = [enc(y) + [tok.eos_token_id] for y in valid]
    wrong = enc("99") + [tok.eos_token_id]  # well formed, wrong: its partial credit
    cut = enc(valid[0])  # a valid answer without its <eos> (length limit): another response

    def fixed(prompt_ids):
        ids = [exact[0], exact[1], wrong, cut, exact[0]]
        return [Completion(np.array(i, np.int32), np.zeros(len(i), np.float32), "stop")
                for i in ids]  # fmt: skip

    others, drawn = draw_others(Reference(None, tok, "mean", draw=fixed), task, prompt, [], exact)
    assert drawn == 5
    credit = task.verify(prompt, "99").reward
    assert 0 < credit < 1
    assert sorted(others) == sorted([(len(wrong), credit), (len(cut), 1.0)])
