"""MathTask: answer extraction, math-verify equivalence, failures as reasons (never raises),
verification off the main thread, problem files and their errors."""

import pickle
import threading
import time
from pathlib import Path

import pytest
import yaml

from flowrl_async.tasks import PromptSource, load_task
from flowrl_async.tasks.math import MathTask, extract_answer, last_boxed

from factories import write_jsonl

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def problems(tmp_path):
    return write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"problem": "Half of one?", "answer": "\\frac{1}{2}"},
            {"question": "Solve 2x = 6.", "solution": "Divide: $x = \\boxed{3}$."},
            {"problem": "Three quarters?", "answer": 0.75},
        ],
    )


@pytest.fixture
def task(problems):
    return MathTask(str(problems), held_out_fraction=0.0, isolate=False)


def test_extraction():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("\\boxed{1} and \\boxed{\\frac{1}{2}") is None  # unclosed last box
    assert extract_answer("so $\\boxed{ 42 }$.") == "42"
    assert extract_answer("work...\nAnswer: $x = 3$.\n") == "x = 3"
    assert extract_answer("**Final answer:** 12") == "12"
    assert extract_answer("Answer: 1\nAnswer: 2") == "2"
    assert extract_answer("\\boxed{5}\nAnswer: 6") == "5"  # a box wins over a line
    assert extract_answer("no answer here") is None
    assert extract_answer("Answer:   ") is None
    assert extract_answer("\\boxed{}") is None


def test_rows_and_gold(task):
    p = task.train_prompts
    assert [x.prompt_id for x in p] == [0, 1, 2]
    assert [x.answer for x in p] == ["\\frac{1}{2}", "3", "0.75"]  # boxed gold reduced
    assert p[0].text.startswith("Half of one?\n\n") and "\\boxed{}" in p[0].text
    assert task.eval_prompts == []


@pytest.mark.parametrize(
    "completion, reward, info",
    [
        ("So the answer is $\\boxed{\\frac{1}{2}}$.", 1.0, "ok"),
        ("\\boxed{0.5}", 1.0, "ok"),
        ("\\boxed{\\dfrac{2}{4}}", 1.0, "ok"),
        ("Answer: 1/2", 1.0, "ok"),
        ("\\boxed{\\frac12}", 1.0, "ok"),
        ("\\boxed{0.6}", 0.0, "wrong"),
        ("\\boxed{2}", 0.0, "wrong"),
        ("I am not sure.", 0.0, "no answer"),
        ("\\boxed{\\frac{1}{2}", 0.0, "no answer"),  # never closed
        ("\\boxed{\\frac{1}}", 0.0, "parse error: '\\\\frac{1}'"),
        ("\\boxed{}{", 0.0, "no answer"),
        # hedging: several candidates never earn the reward, whichever holds the gold one
        ("\\boxed{2} no wait \\boxed{\\frac{1}{2}}", 0.0, "several answers"),
        ("\\boxed{\\frac{1}{2}} or \\boxed{3}", 0.0, "several answers"),
        ("\\boxed{\\frac{1}{2} \\text{ or } 3}", 0.0, "wrong"),
        ("\\boxed{\\frac{1}{2}, 3}", 0.0, "wrong"),
        ("\\boxed{\\{\\frac{1}{2}, 3\\}}", 0.0, "wrong"),
        ("Answer: 1/2 or 3", 0.0, "wrong"),
        # the same answer boxed twice (spaces aside) is one answer
        ("\\boxed{\\frac{1}{2}}, so \\boxed{ \\frac{1}{2} }", 1.0, "ok"),
    ],
)
def test_verify_half(task, completion, reward, info):
    v = task.verify(task.train_prompts[0], completion)
    assert (v.reward, v.info) == (reward, info)


def test_verify_equivalent_forms(task):
    three, quarters = task.train_prompts[1], task.train_prompts[2]
    assert task.verify(three, "\\boxed{x = 3}").info == "ok"
    assert task.verify(three, "\\boxed{3.0}").info == "ok"
    assert task.verify(three, "\\boxed{3\\text{ cm}}").info == "ok"
    assert task.verify(three, "\\boxed{-3}").info == "wrong"
    assert task.verify(quarters, "\\boxed{\\frac{3}{4}}").info == "ok"
    assert task.verify(quarters, "\\boxed{75\\%}").info == "wrong"
    v = task.verify(three, "\\boxed{ 3 }")
    assert (v.reward, v.info, v.answer) == (1.0, "ok", "3")


def test_rewards_configurable(problems):
    t = MathTask(str(problems), held_out_fraction=0.0, wrong_reward=-1.0, correct_reward=2.0,
                 isolate=False)  # fmt: skip
    p = t.train_prompts[0]
    assert t.verify(p, "\\boxed{1/2}").reward == 2.0
    assert t.verify(p, "\\boxed{1}").reward == -1.0
    assert t.verify(p, "nothing").reward == -1.0
    assert t.verify(p, "\\boxed{\\frac{1}}").reward == -1.0


def test_verify_never_raises_on_odd_input(task):
    p = task.train_prompts[0]
    for completion in ["", "\\boxed{\\boxed{}}", "\\boxed{" + "(" * 500 + "}", "\x00\\boxed{1}",
                       "\\boxed{\\begin{pmatrix}1\\end{pmatrix}}", "\\boxed{1/0}"]:  # fmt: skip
        v = task.verify(p, completion)
        assert v.reward == 0.0 and v.info != "ok"


def test_verify_off_the_main_thread(task):
    p = task.train_prompts[0]
    out = []
    worker = threading.Thread(
        target=lambda: out.extend(task.verify(p, c) for c in ["\\boxed{0.5}", "\\boxed{1}"])
    )
    worker.start()
    worker.join(timeout=60)
    assert [(v.reward, v.info) for v in out] == [(1.0, "ok"), (0.0, "wrong")]


def test_split_and_eval_path(tmp_path):
    rows = [{"problem": f"p{i}", "answer": str(i)} for i in range(20)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    t = MathTask(str(path), held_out_fraction=0.25, seed=3, isolate=False)
    train, held = [p.prompt_id for p in t.train_prompts], [p.prompt_id for p in t.eval_prompts]
    assert len(held) == 5 and sorted(train + held) == list(range(20))
    again = MathTask(str(path), held_out_fraction=0.25, seed=3, isolate=False)
    assert [p.prompt_id for p in again.eval_prompts] == held  # the split is seeded
    other = write_jsonl(tmp_path / "e.jsonl", [{"problem": "q", "answer": "7"}])
    t2 = MathTask(str(path), eval_path=str(other), isolate=False)
    assert len(t2.train_prompts) == 20
    assert [(p.prompt_id, p.answer) for p in t2.eval_prompts] == [(20, "7")]


def test_custom_fields_and_template(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"q": "1+1?", "gold": "2"}])
    t = MathTask(str(path), problem_field="q", answer_field="gold", held_out_fraction=0.0,
                 prompt_template="Q: {prompt}\nA:", isolate=False)  # fmt: skip
    assert t.train_prompts[0].text == "Q: 1+1?\nA:"
    assert t.verify(t.train_prompts[0], "Answer: 2").info == "ok"


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"problem": "x", "answer": ', r"p\.jsonl:2: not valid JSON"),
        ('["problem", "answer"]', r"p\.jsonl:2: a row must be a JSON object"),
        ('{"problem": "x"}', r"p\.jsonl:2: missing field 'answer' or 'solution'"),
        ('{"answer": "1"}', r"p\.jsonl:2: missing field 'problem' or 'question'"),
        ('{"problem": "  ", "answer": "1"}', r"p\.jsonl:2: field .* non-empty string"),
        ('{"problem": "x", "solution": "no box but \\\\boxed{"}', r"p\.jsonl:2: no usable gold"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": "ok", "answer": "1"}, bad_line])
    with pytest.raises(ValueError, match=message):
        MathTask(str(path), isolate=False)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        MathTask(str(tmp_path / "missing.jsonl"))
    (tmp_path / "p.csv").write_text("problem,answer\n")
    with pytest.raises(ValueError, match="unknown problem file format"):
        MathTask(str(tmp_path / "p.csv"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no problems"):
        MathTask(str(tmp_path / "empty.jsonl"))


def test_parquet(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        (tmp_path / "p.parquet").write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pyarrow"):
            MathTask(str(tmp_path / "p.parquet"))
        return
    table = pa.table({"problem": ["1+1?", "2+2?"], "answer": ["2", "4"]})
    pq.write_table(table, tmp_path / "p.parquet")
    t = MathTask(str(tmp_path / "p.parquet"), held_out_fraction=0.0, isolate=False)
    assert [p.answer for p in t.train_prompts] == ["2", "4"]


def test_shipped_config_and_example_data():
    cfg = yaml.safe_load((ROOT / "configs/task/math.yaml").read_text())
    task = load_task(cfg["target"], **{**cfg["kwargs"], "isolate": False})
    assert task.name == "math"
    assert (len(task.train_prompts), len(task.eval_prompts)) == (6, 2)
    source = PromptSource(task, seed=0)
    p = source.at(0)
    assert source.verify(p, f"\\boxed{{{p.answer}}}").info == "ok"


# ---- the checker child process (the default, isolate=True) ----


@pytest.mark.integration
def test_isolated_checker_from_threads(problems):
    task = MathTask(str(problems), held_out_fraction=0.0)
    try:
        p = task.train_prompts[0]
        assert task.verify(p, "\\boxed{0.5}").info == "ok"
        out = {}

        def run(i):
            out[i] = task.verify(p, "\\boxed{1/2}" if i % 2 else "\\boxed{2}")

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert [out[i].info for i in range(4)] == ["wrong", "ok", "wrong", "ok"]
        clone = pickle.loads(pickle.dumps(task))  # the child process is not pickled
        assert clone.verify(p, "\\boxed{\\frac{1}{2}}").info == "ok"
        clone.close()
    finally:
        task.close()


@pytest.mark.integration
def test_isolated_checker_hard_timeout_and_restart(problems):
    task = MathTask(str(problems), held_out_fraction=0.0, timeout_s=1.0)
    try:
        p = task.train_prompts[0]
        assert task.verify(p, "\\boxed{0.5}").info == "ok"  # started and warm
        task._checker.hard_timeout = 0.3  # below math-verify's own 1 s alarms
        t0 = time.monotonic()
        v = task.verify(p, "\\boxed{9^{9^{9^{9}}}}")  # a power tower sympy cannot finish
        assert (v.reward, v.info) == (0.0, "timeout")
        assert time.monotonic() - t0 < 5.0
        task._checker.hard_timeout = 30.0
        assert task.verify(p, "\\boxed{\\frac{2}{4}}").info == "ok"  # a fresh child
    finally:
        task.close()
