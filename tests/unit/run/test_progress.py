"""The end-of-run summary and curves (flowrl_async/run/progress.py): distinct answers and
coverage from the periodic evaluation stand beside accuracy."""

from flowrl_async.run.progress import plot_curves, print_summary, summarize


def rows():
    out = []
    for step in range(1, 11):
        row = {"step": step, "reward_mean": step / 10, "accuracy": step / 20,
               "distinct_correct": 1.0, "wait_s": 0.1, "step_s": 1.0, "time": float(step),
               "loss": 0.5, "entropy": 1.0, "staleness_mean": 1.0}  # fmt: skip
        if step % 5 == 0:  # evaluation.every = 5
            row.update(eval_accuracy=step / 40, eval_distinct_correct=step / 2.5,
                       eval_coverage=step / 50)  # fmt: skip
        out.append(row)
    return out


def test_the_summary_keeps_the_first_and_last_evaluation(tmp_path, capsys):
    s = summarize(rows())
    assert (s["eval_accuracy_first"], s["eval_accuracy_last"]) == (0.125, 0.25)
    assert (s["eval_distinct_correct_first"], s["eval_distinct_correct_last"]) == (2.0, 4.0)
    assert (s["eval_coverage_first"], s["eval_coverage_last"]) == (0.1, 0.2)
    assert s["accuracy_first"] == (0.05 + 0.1) / 2  # the first fifth of training batches
    print_summary({**s, "steps": 10, "run_dir": "r", "final_policy": "r/final_policy"})
    out = capsys.readouterr().out
    assert "evaluation: distinct correct / prompt (first → last)  2.000 → 4.000" in out
    assert "evaluation: coverage of the valid set (first → last)  0.100 → 0.200" in out
    assert plot_curves(rows(), tmp_path / "curves.png").stat().st_size > 0


def test_a_run_without_evaluation_has_no_evaluation_lines(capsys):
    plain = [{k: v for k, v in r.items() if not k.startswith("eval_")} for r in rows()]
    s = summarize(plain)
    assert not any(k.startswith("eval_") for k in s)
    print_summary({**s, "steps": 10, "run_dir": "r", "final_policy": "r/final_policy"})
    assert "evaluation:" not in capsys.readouterr().out
