"""CodeTask: code extraction, problem files, and the sandbox: right and wrong programs, and
programs that loop, fork without bound, allocate without bound, signal their parent, reach
for the network or write outside their directory; none of it may harm the caller."""

import os
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml

from flowrl_async.tasks import PromptSource, load_task
from flowrl_async.tasks.checks import Check, parse_check
from flowrl_async.tasks.code import CodeTask, Prompt, extract_code

from factories import write_jsonl

ROOT = Path(__file__).resolve().parents[2]

ADD = "def add(a, b):\n    return a + b\n"
SUM_IO = "a, b = map(int, input().split())\nprint(a + b)\n"


@pytest.fixture
def problems(tmp_path):
    return write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Write add(a, b).", "tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]},
            {"prompt": "Print a + b.", "tests": [{"input": "1 2\n", "output": "3\n"},
                                                 {"input": "5 5\n", "output": "10"}]},
        ],
    )  # fmt: skip


def asserts(*tests: str) -> Prompt:
    return Prompt(0, "", tuple(parse_check(t, "test") for t in tests), "asserts")


def make(problems, **kwargs) -> CodeTask:
    try:
        return CodeTask(str(problems), held_out_fraction=0.0, **kwargs)
    except RuntimeError as e:  # namespaces unavailable on this machine
        pytest.skip(str(e))


@pytest.fixture
def task(problems):
    return make(problems, timeout_s=3.0)


def test_extract_code():
    assert extract_code("Here:\n```python\nx = 1\n```\nthanks") == "x = 1\n"
    assert extract_code("```python\nx = 1\n```\n```python\nx = 2\n```") == "x = 2\n"
    assert extract_code("```py\nx = 1\n```\n```\nplain\n```") == "x = 1\n"
    assert extract_code("```\nx = 3\n```") == "x = 3\n"
    assert extract_code("```text\nno\n```") == "```text\nno\n```"  # no python: whole text
    assert extract_code("```python\nx = 4\n") == "x = 4\n"  # cut off before the fence closed
    assert extract_code("x = 5") == "x = 5"


def test_rows(problems):
    t = CodeTask(str(problems), held_out_fraction=0.0, isolation="none")
    a, io = t.train_prompts
    assert a.kind == "asserts"
    assert a.tests == (Check("value", "add(1, 2)", "eq", 3), Check("value", "add(2, 2)", "eq", 4))
    assert (io.kind, io.tests) == ("io", (("1 2\n", "3\n"), ("5 5\n", "10")))
    assert a.text.startswith("Write add(a, b).\n\n") and "```python" in a.text
    assert [p.prompt_id for p in t.train_prompts] == [0, 1]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "x", "tests": []}', r"p\.jsonl:2: tests must be a non-empty list"),
        ('{"prompt": "x", "tests": "assert 1"}', r"p\.jsonl:2: tests must be a non-empty list"),
        ('{"prompt": "x", "tests": ["assert 1", {"input": "", "output": ""}]}',
         r"p\.jsonl:2: tests must be all assert-style"),
        ('{"prompt": "x", "tests": [{"input": "1"}]}', r"p\.jsonl:2: tests must be all"),
        ('{"tests": ["assert 1"]}', r"p\.jsonl:2: missing field 'prompt'"),
        ('{"prompt": "x"', r"p\.jsonl:2: not valid JSON"),
    ],
)  # fmt: skip
def test_bad_rows_name_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok", "tests": ["assert 1"]}, bad_line])
    with pytest.raises(ValueError, match=message):
        CodeTask(str(path), isolation="none")


def test_bad_isolation_name(problems):
    with pytest.raises(ValueError, match="isolation must be one of"):
        CodeTask(str(problems), isolation="docker")


def test_shipped_config_and_example_data():
    cfg = yaml.safe_load((ROOT / "configs/task/code.yaml").read_text())
    task = load_task(cfg["target"], **{**cfg["kwargs"], "isolation": "none"})
    assert task.name == "code"
    assert (len(task.train_prompts), len(task.eval_prompts)) == (4, 2)
    kinds = sorted(p.kind for p in task.train_prompts + task.eval_prompts)
    assert kinds == ["asserts"] * 4 + ["io"] * 2


# ---- running code (subprocesses) ----


@pytest.mark.integration
@pytest.mark.parametrize(
    "completion, reward, info",
    [
        (f"Sure:\n```python\n{ADD}```\n", 1.0, "ok"),
        ("def add(a, b):\n    return a - b\n", 0.0, "failed 2/2"),
        ("def add(a, b):\n    return 3\n", 0.0, "failed 1/2"),
        ("def add(a, b) return a\n", 0.0, "crash"),  # syntax error
        ("raise ValueError('no')\n", 0.0, "crash"),
        ("import sys\nsys.exit(0)\n", 0.0, "crash"),
        ("import os\nos._exit(0)\n", 0.0, "crash"),  # died before the tests
        ("```python\n\n```", 0.0, "no code"),
        (ADD + "if __name__ == '__main__':\n    print(add(int(input()), 1))\n", 1.0, "ok"),
    ],
)
def test_asserts(task, completion, reward, info):
    v = task.verify(task.train_prompts[0], completion)
    assert (v.reward, v.info) == (reward, info)
    assert v.answer == (extract_code(completion).strip() if info == "ok" else None)


@pytest.mark.integration
@pytest.mark.parametrize(
    "completion, reward, info",
    [
        (SUM_IO, 1.0, "ok"),
        ("import sys\na, b = map(int, sys.stdin.buffer.read().split())\nprint(a + b, '  ')\n\n",
         1.0, "ok"),  # trailing spaces ignored
        ("print(3)\n", 0.0, "failed 1/2"),
        ("a, b = map(int, input().split())\nprint(a * b)\n", 0.0, "failed 2/2"),
        ("import sys\nprint(1)\nsys.exit(2)\n", 0.0, "failed 2/2"),
        ("x = input()\nprint(x * 10**6)\n", 0.0, "failed 2/2"),  # past the output limit
    ],
)  # fmt: skip
def test_stdin_stdout(task, completion, reward, info):
    v = task.verify(task.train_prompts[1], completion)
    assert (v.reward, v.info) == (reward, info)


@pytest.mark.integration
def test_partial_credit(problems):
    t = make(problems, all_or_nothing=False, wrong_reward=-1.0)
    a = t.train_prompts[0]
    assert (t.verify(a, "def add(a, b):\n    return 3\n").reward, t.verify(a, ADD).reward) == (
        0.0,  # halfway between -1 and 1
        1.0,
    )
    assert t.verify(a, "def add(a, b):\n    return 0\n").reward == -1.0


@pytest.mark.integration
def test_infinite_loop_times_out(problems):
    t = make(problems, timeout_s=2.0)
    t0 = time.monotonic()
    v = t.verify(t.train_prompts[0], "def add(a, b):\n    while True:\n        pass\n")
    assert (v.reward, v.info) == (0.0, "timeout")
    assert 2.0 <= time.monotonic() - t0 < 6.0
    v = t.verify(t.train_prompts[0], "import time\ntime.sleep(60)\n")  # idle, not CPU
    assert (v.reward, v.info) == (0.0, "timeout")


def _marked(mark: str) -> int:
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    n += mark.encode() in f.read()
            except OSError:
                pass
    return n


@pytest.mark.integration
def test_fork_bomb_is_contained_and_cleaned_up(problems):
    t = make(problems, timeout_s=2.0)
    mark = f"flowrl-bomb-{os.getpid()}-{time.monotonic_ns()}"
    # children leave the process group (setsid) and exec a marked sleeper, until forking fails
    bomb = (
        "import os, sys, time\n"
        "for _ in range(1000):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.setsid()\n"
        f"            os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {mark!r}])\n"
        "    except OSError:\n"
        "        break\n"
        "time.sleep(60)\n"
    )  # fmt: skip
    seen, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            seen[0] = max(seen[0], _marked(mark))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        v = t.verify(t.train_prompts[0], bomb)
    finally:
        stop.set()
        watcher.join()
    assert (v.reward, v.info) == (0.0, "timeout")
    assert 0 < seen[0] < t.max_processes  # it forked, up to the process limit
    assert _marked(mark) == 0  # nothing left behind
    # the classic bomb: every process forks forever; the first failed fork crashes the worker
    v = t.verify(t.train_prompts[0], "import os\nwhile True:\n    os.fork()\n")
    assert (v.reward, v.info) == (0.0, "crash")
    assert t.verify(t.train_prompts[0], ADD).info == "ok"  # the machine still forks


@pytest.mark.integration
@pytest.mark.parametrize(
    "hog",
    [
        "x = bytearray(8 * 1024**3)\n",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n",
        "def add(a, b):\n    return len([0] * 10**10)\n",  # in a test, not at import
    ],
)
def test_memory_hog(task, hog):
    v = task.verify(task.train_prompts[0], hog)
    assert (v.reward, v.info) == (0.0, "memory")


@pytest.mark.integration
def test_killing_the_parent_does_not_reach_the_caller(task):
    code = "import os, signal\n" + ADD + "os.kill(os.getppid(), signal.SIGKILL)\n"
    v = task.verify(task.train_prompts[0], code)
    # root isolation: the parent runs as another uid (EPERM); user: PID 1 ignores the signal
    assert v.info == ("crash" if task.isolation == "root" else "ok")
    code = "import os, signal\n" + ADD + "os.killpg(0, signal.SIGKILL)\n"
    assert task.verify(task.train_prompts[0], code).info == "crash"  # it killed only itself
    assert task.verify(task.train_prompts[0], ADD).info == "ok"  # we are still here


@pytest.mark.integration
def test_no_network(task):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        code = ADD + (
            "import socket\n"
            "def reach(host, port):\n"
            "    try:\n"
            "        socket.create_connection((host, port), timeout=1).close()\n"
            "        return True\n"
            "    except OSError:\n"
            "        return False\n"
        )
        tests = (f"assert reach('127.0.0.1', {port})", "assert reach('1.1.1.1', 53)")
        v = task.verify(asserts(*tests), code)
        assert (v.reward, v.info) == (0.0, "failed 2/2")
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing came in


@pytest.mark.integration
def test_cannot_write_outside_its_directory(task, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # writable by anyone: only the read-only mounts stop it
    victim = shared / "victim.txt"
    victim.write_text("intact")
    victim.chmod(0o666)
    code = ADD + (
        "import os\n"
        "def attempt(action):\n"
        "    try:\n"
        "        action()\n"
        "        return True\n"
        "    except OSError:\n"
        "        return False\n"
        "def local():\n"
        "    with open('scratch.txt', 'w') as f:\n"
        "        f.write('fine')\n"
        "    return open('scratch.txt').read()\n"
    )
    tests = (
        f"assert attempt(lambda: open({str(victim)!r}, 'w').write('pwned'))",
        f"assert attempt(lambda: os.unlink({str(victim)!r}))",
        f"assert attempt(lambda: open({str(shared / 'new.txt')!r}, 'w'))",
        f"assert attempt(lambda: open({str(ROOT / 'sandbox-was-here')!r}, 'w'))",
        "assert local() == 'fine'",  # its own directory is writable
    )
    v = task.verify(asserts(*tests), code)
    assert (v.reward, v.info) == (0.0, "failed 4/5")
    assert victim.read_text() == "intact"
    assert sorted(p.name for p in shared.iterdir()) == ["victim.txt"]
    assert not (ROOT / "sandbox-was-here").exists()


@pytest.mark.integration
def test_concurrent_verifies_from_threads(task):
    out = {}

    def run(i):
        code = ADD if i % 2 else "def add(a, b):\n    return 0\n"
        out[i] = task.verify(task.train_prompts[0], code).info

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [out[i] for i in range(4)] == ["failed 2/2", "ok", "failed 2/2", "ok"]


@pytest.mark.integration
def test_temp_dirs_removed(task):
    import tempfile

    before = {p.name for p in Path(tempfile.gettempdir()).glob("flowrl-code-*")}
    task.verify(task.train_prompts[0], ADD + "open('junk', 'w').write('x' * 1000)\n")
    task.verify(task.train_prompts[0], "while True: pass\n")
    after = {p.name for p in Path(tempfile.gettempdir()).glob("flowrl-code-*")}
    assert after <= before


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() == 0, reason="refused for root: test_code_redteam.py")
def test_user_namespace_isolation(problems, tmp_path):
    t = make(problems, timeout_s=3.0, isolation="user")
    assert t.isolation == "user"
    a = t.train_prompts[0]
    assert (t.verify(a, ADD).info, t.verify(a, "def add(a, b):\n    return 0\n").info) == (
        "ok",
        "failed 2/2",
    )
    victim = tmp_path / "victim.txt"
    victim.write_text("intact")  # owned by the caller, whose uid the code keeps here
    code = ADD + f"open({str(victim)!r}, 'w').write('pwned')\n"
    assert t.verify(a, code).info == "crash"
    assert victim.read_text() == "intact"
    assert t.verify(t.train_prompts[1], SUM_IO).info == "ok"


@pytest.mark.integration
def test_no_isolation_runs_benign_code(problems):
    t = CodeTask(str(problems), held_out_fraction=0.0, timeout_s=2.0, isolation="none")
    a = t.train_prompts[0]
    assert t.verify(a, ADD).info == "ok"
    assert t.verify(a, "def add(a, b):\n    return a - b\n").info == "failed 2/2"
    assert t.verify(a, "while True: pass\n").info == "timeout"
    assert t.verify(t.train_prompts[1], SUM_IO).info == "ok"


@pytest.mark.integration
def test_prompt_source_round_trip():
    cfg = yaml.safe_load((ROOT / "configs/task/code.yaml").read_text())
    try:
        task = load_task(cfg["target"], **cfg["kwargs"])
    except RuntimeError as e:  # namespaces unavailable on this machine
        pytest.skip(str(e))
    source = PromptSource(task, seed=0)
    prompt = next(p for p in task.train_prompts + task.eval_prompts if "their sum" in p.text)
    assert source.verify(prompt, f"```python\n{SUM_IO}```").info == "ok"
    assert source.verify(prompt, "print('nope')").info == "failed 3/3"
