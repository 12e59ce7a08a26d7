"""The evidence benchmark's figures (flowrl_async/run/evidence.py) and each target's share on
the valid set (tasks/target.py: valid_mass), against hand-computed values."""

import math

import pytest

from flowrl_async.run import evidence
from flowrl_async.tasks.target import valid_mass

REPORT = {"own": [0.5, 0.25, 0.25], "tb": [0.2, 0.4, 0.4], "lengths": [2, 4, 6],
          "own_mass": 0.9, "tb_mass": 0.8}  # fmt: skip
VALID = ("1", "2", "3")


def test_a_prompt_record_counts_and_measures_against_both_targets():
    rec = evidence.prompt_record(["1", "1", "2", None, "7"], VALID, REPORT)  # "7": not valid
    assert (rec["n"], rec["correct"], rec["distinct"]) == (5, 3, 2)
    assert rec["coverage"] == pytest.approx(2 / 3, abs=1e-12)
    # empirical (2/3, 1/3, 0): TV to own = (1/6 + 1/12 + 1/4) / 2, to tb = (7/15 + 1/15 + 2/5) / 2
    assert rec["tv_own"] == pytest.approx(0.25, abs=1e-12)
    assert rec["tv_tb"] == pytest.approx(7 / 15, abs=1e-12)
    assert rec["length"] == pytest.approx(8 / 3, abs=1e-12)  # lengths 2, 2, 4
    assert rec["own_length"] == pytest.approx(3.5, abs=1e-12)
    assert rec["tb_length"] == pytest.approx(4.4, abs=1e-12)
    assert rec["lengths"] == pytest.approx({"2": 2 / 3, "4": 1 / 3})
    assert rec["own_lengths"] == {"2": 0.5, "4": 0.25, "6": 0.25}
    assert (rec["own_mass"], rec["tb_mass"]) == (0.9, 0.8)
    assert rec["answers"] == {"1": 2, "2": 1}
    # 3 draws of (1/2, 1/4, 1/4): Σ 1 − (1 − p)^3 = 7/8 + 37/64 + 37/64
    assert rec["own_distinct"] == pytest.approx(7 / 8 + 2 * 37 / 64, abs=1e-12)
    assert rec["tb_distinct"] == pytest.approx(1 - 0.8**3 + 2 * (1 - 0.6**3), abs=1e-12)


def test_a_prompt_with_no_correct_answer_has_no_distance():
    rec = evidence.prompt_record([None, None], VALID, REPORT)
    assert (rec["correct"], rec["distinct"], rec["coverage"]) == (0, 0, 0.0)
    assert math.isnan(rec["tv_own"]) and math.isnan(rec["tv_tb"])
    assert math.isnan(rec["length"]) and math.isnan(rec["tv_own_floor"])


def test_the_floor_is_the_expected_distance_of_a_sample_of_the_target():
    assert evidence.tv_floor([1.0, 0.0], 5) == 0.0  # a point mass: every sample is exact
    assert evidence.tv_floor([0.5, 0.5], 1) == pytest.approx(0.5, abs=1e-12)  # one-hot: 1/2
    # two samples of (1/2, 1/2): both alike (TV 1/2) half the time, split (TV 0) otherwise
    assert evidence.tv_floor([0.5, 0.5], 2, draws=4000) == pytest.approx(0.25, abs=0.02)
    assert math.isnan(evidence.tv_floor([0.5, 0.5], 0))


def test_run_figures_average_prompts_and_estimate_pass_at_k():
    solved = evidence.prompt_record(["1", "1", "2", None], VALID, REPORT)  # n 4, c 3
    unsolved = evidence.prompt_record([None] * 4, VALID, REPORT)
    f = evidence.run_figures([solved, unsolved], ks=(1, 4, 16))
    assert f["pass@1"] == pytest.approx(0.375, abs=1e-12)  # (3/4 + 0) / 2
    assert f["pass@4"] == pytest.approx(0.5, abs=1e-12)  # (1 + 0) / 2
    assert "pass@16" not in f  # 4 samples cannot estimate it
    assert f["distinct"] == 1.0 and f["coverage"] == pytest.approx(1 / 3, abs=1e-12)
    assert f["length"] == pytest.approx(8 / 3, abs=1e-12)  # the solved prompt only
    assert f["length_vs_own"] == pytest.approx(8 / 3 - 3.5, abs=1e-12)
    assert f["tv_own"] == pytest.approx(0.25, abs=1e-12)  # the solved prompt only


def test_interval_is_the_t_interval_over_seeds():
    s = evidence.interval([1.0, 2.0, 3.0])
    assert (s["mean"], s["std"], s["n"]) == (2.0, 1.0, 3)
    assert s["ci95"] == pytest.approx(4.303 / math.sqrt(3), abs=1e-12)
    five = evidence.interval([0.0, 0.0, 0.0, 0.0, 1.0])  # std sqrt(0.2), t(4) = 2.776
    assert five["ci95"] == pytest.approx(2.776 * math.sqrt(0.2) / math.sqrt(5), abs=1e-12)
    assert math.isnan(evidence.interval([1.0])["ci95"])
    assert evidence.t_quantile(11) == 2.201 and evidence.t_quantile(40) == 2.042
    with pytest.raises(ValueError):
        evidence.t_quantile(0)


def test_length_histograms_average_the_prompts_that_have_answers():
    recs = [{"lengths": {"2": 1.0}}, {"lengths": {"2": 0.5, "4": 0.5}}, {"lengths": {}}]
    assert evidence.length_histogram(recs, "lengths") == {2: 0.75, 4: 0.25}


LOGPS, INSIDE_R = [math.log(0.2), math.log(0.1)], [1.0, 1.0]
OUTSIDE = [(1, 0.0), (1, 0.0)]  # two of 4 draws of π_ref fell outside the valid set


def test_the_sum_forms_share_on_the_valid_set():
    # e^β = 3: valid weights 0.6 + 0.3, outside 1/4 + 1/4 -> 0.9 / 1.4
    m = valid_mass(LOGPS, [1, 1], INSIDE_R, "sum", math.log(3), OUTSIDE, 4)
    assert m == pytest.approx(0.9 / 1.4, abs=1e-12)


def test_the_mean_forms_share_is_the_sum_forms_at_length_times_beta():
    # every response of length L: π_ref·exp(L(β r − c)) is the sum form at β' = L·β
    one = valid_mass(LOGPS, [1, 1], INSIDE_R, "mean", math.log(3), OUTSIDE, 4)
    assert one == pytest.approx(0.9 / 1.4, abs=1e-9)
    two = valid_mass(LOGPS, [2, 2], INSIDE_R, "mean", math.log(3), [(2, 0.0), (2, 0.0)], 4)
    assert two == pytest.approx(2.7 / 3.2, abs=1e-9)  # e^(2β) = 9: 1.8 + 0.9 vs 0.5


def test_the_mean_forms_normaliser_weighs_each_length():
    # one valid answer (π_ref 1/2, 1 token, e^β = 3.5) and half the mass outside at 2 tokens:
    # 1.75·e^(-c) + 0.5·e^(-2c) = 1 at c = log 2, so the valid share is 1.75 / 2 = 0.875
    # (a normaliser outside the length factor, m + nβr − c, would give 0.778)
    m = valid_mass([math.log(0.5)], [1], [1.0], "mean", math.log(3.5), [(2, 0.0)], 2)
    assert m == pytest.approx(0.875, abs=1e-9)


def test_the_share_needs_draws_of_pi_ref():
    with pytest.raises(ValueError, match="samples of"):
        valid_mass(LOGPS, [1, 1], INSIDE_R, "sum", 1.0, [], 0)
