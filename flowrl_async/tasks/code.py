"""Python coding problems checked by running the completion against tests in a sandbox.

Problem file: JSONL (or Parquet), one problem per row, ``{"prompt": str, "tests": [...]}``
(field names configurable). ``tests`` is either

- assert-style (``flowrl_async/tasks/checks.py`` has every form): ``"assert add(1, 2) ==
  3"``, ``"assert f(x) is True"``, ``"assert ok(x)"``, ``{"call": "r()", "expected": "1.5",
  "abs_tol": 1e-9}``; the solution runs as module ``solution`` (its ``if __name__ ==
  "__main__":`` block does not run), then each test's call is evaluated in its namespace and
  its value, plain types only, comes back and is compared here, outside the sandbox (the
  expected values never enter it). ``{"exec": "statements"}`` runs statements in the
  candidate's interpreter instead (the one form a candidate can game); or
- stdin/stdout: a list of ``{"input": str, "output": str}``; the solution runs as
  ``__main__`` once per case with that stdin and passes when its stdout equals ``output``
  (trailing whitespace of each line and trailing blank lines ignored). The expected outputs
  never enter the sandbox, so this form cannot be gamed from inside it.

The code is the last ```python (or ```py) fenced block of the completion, else the last
unlabelled fenced block, else the whole text; an unclosed last fence runs to the end.

Verdicts: ``info`` is "ok" (every test passed), "failed k/n" (k of n tests failed),
"timeout" (wall clock or CPU time ran out), "memory" (an allocation hit the memory limit),
"crash" (the solution failed to load, or the process died before finishing), "no code", or
"sandbox error: ..." (the sandbox itself failed). The reward is ``correct_reward`` for "ok"
and ``wrong_reward`` otherwise, or with ``all_or_nothing=False`` the fraction of tests passed
scaled between the two.

Sandbox: ``verify`` never raises and the program cannot harm the caller. Each run gets
``python -I -B -S`` of this Python's own installation (no virtual environment, no site
packages: the standard library), an empty environment, stdin on /dev/null, stdout and
stderr discarded (results come back on a separate channel, capped in size), and these limits
in the process that runs the code: RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_NPROC (processes),
RLIMIT_FSIZE, RLIMIT_NOFILE, no core files; a wall-clock deadline kills the whole process
group. On top of that, ``isolation`` picks how much the kernel isolates (``"auto"`` takes the
first of "root" and "user" that works, probed once per process, and never falls back to
"none": that must be asked for by name):

- ``"root"`` (caller is root, ``unshare`` present) and ``"user"`` (a non-root caller with
  unprivileged user namespaces; refused for root, where it would run the code as the host's
  uid 0): new network, PID, mount, UTS and IPC namespaces (``user``: inside a user
  namespace, the caller's uid mapped to 0). What the candidate sees is a private root, a
  read-only tmpfs holding only: this Python's installation and the system library
  directories (``/lib``, ``/lib64``, ``/usr/lib``, ``/usr/lib64``), read-only bind mounts
  (their submounts too); ``/dev/null``, ``zero``, ``random``, ``urandom``; a read-only
  ``/proc`` with ``hidepid=2,subset=pid`` (its own processes, no ``/proc/sys``); a
  size-capped tmpfs at ``/tmp`` (``noexec``), its working directory and the only place it
  can write. The host's root is detached (``pivot_root``, then a lazy unmount): no
  repository, runs, replay logs, home directories or ``/etc``. It runs with empty
  effective, permitted, inheritable, ambient and bounding capability sets,
  ``no_new_privs``, and locked securebits (no capabilities for uid 0 at exec, none kept
  across setuid), whatever user started the actor; ``root``: under a fresh random uid too
  (so RLIMIT_NPROC counts only its processes). The supervisor is not dumpable (``/proc/1``
  and ptrace closed to it) and leaves every signal at its default (PID 1 then drops
  signals sent from inside). Not done: a seccomp filter (no well-kept library for one is on
  the machine: the kernel's system calls are all reachable, inside those namespaces; the
  code may make user namespaces of its own), a cgroup (memory is bounded per process,
  times the process limit); with ``user``, a non-root caller's own processes count
  against RLIMIT_NPROC.
- ``"none"``: limits and the process group only: no network isolation, the host's files
  readable and those writable by the caller writable by the code, processes that call
  setsid survive the deadline, and for root RLIMIT_NPROC is not enforced. Only for trusted
  code or machines without namespaces.

Why this holds: the code runs in a child of a small supervisor that is PID 1 of the new PID
namespace; when the supervisor ends (normally or killed with the group on the deadline) the
kernel kills every process left in the namespace, including ones that called setsid. The
code cannot signal the caller (it cannot see it) nor the supervisor (PID 1 ignores signals
from inside). Grading cannot be influenced from inside: the code can rewrite anything in its
own interpreter, forge result lines (a second report of a test fails it) or return any plain
value, but the comparison runs here against expected values it never saw; a value that is
not exactly a plain type (e.g. an ``int`` subclass whose ``__eq__`` is always true) fails.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from flowrl_async.tasks.checks import decode_value, parse_check, passes
from flowrl_async.tasks.datafiles import Verdict, load_split, pick, text_field
from flowrl_async.tasks.sandbox import SUPERVISOR, WORKER, Run, kill_group, runtime, stop

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "{prompt}\n\nWrite the solution as Python code in one ```python code block."
_UID_BASE, _UID_SPAN = 3_000_000, 1_000_000_000  # fresh uids for "root" isolation


@dataclass(frozen=True)
class Prompt:
    """One coding problem and its tests."""

    prompt_id: int
    text: str
    tests: tuple  # checks.Check per assert-style test, or (input, output) pairs
    kind: str  # "asserts" or "io"


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str) -> str:
    """Last ```python block, else last unlabelled block, else the whole text."""
    blocks = _FENCE.findall(text)
    for wanted in (("python", "py", "python3"), ("",)):
        found = [body for lang, body in blocks if lang.lower() in wanted]
        if found:
            return found[-1]
    return text


_probed: dict[str, bool] = {}
_probe_lock = threading.Lock()


class CodeTask:
    """Coding problems verified by running the completion against tests in a sandbox."""

    name = "code"

    def __init__(
        self,
        path: str,
        eval_path: str | None = None,
        held_out_fraction: float = 0.1,
        seed: int = 0,
        prompt_field: str | Sequence[str] = ("prompt", "question", "problem"),
        tests_field: str | Sequence[str] = ("tests",),
        prompt_template: str = DEFAULT_TEMPLATE,
        correct_reward: float = 1.0,
        wrong_reward: float = 0.0,
        all_or_nothing: bool = True,
        timeout_s: float = 5.0,
        memory_mb: int = 512,
        max_processes: int = 16,
        max_file_mb: int = 16,
        disk_mb: int = 64,
        output_limit_bytes: int = 1 << 20,
        isolation: str = "auto",
    ):
        """``prompt_template``: ``{prompt}`` is replaced by the problem text. ``eval_path``:
        held-out problems from their own file (then ``held_out_fraction`` is unused).
        ``timeout_s``: wall clock for one sandbox run, interpreter start included (~0.1 s)."""

        def make(i: int, where: str, row: dict) -> Prompt:
            return self._prompt(i, where, row, prompt_field, tests_field, prompt_template)

        self.train_prompts, self.eval_prompts = load_split(
            path, eval_path, held_out_fraction, seed, make
        )
        self.correct_reward, self.wrong_reward = correct_reward, wrong_reward
        self.all_or_nothing = all_or_nothing
        self.timeout_s, self.memory_mb, self.max_processes = timeout_s, memory_mb, max_processes
        self.max_file_mb, self.disk_mb = max_file_mb, disk_mb
        self.output_limit_bytes = output_limit_bytes
        self.isolation = self._choose_isolation(isolation)

    @staticmethod
    def _prompt(i, where, row, prompt_field, tests_field, template) -> Prompt:
        text = template.replace("{prompt}", text_field(row, prompt_field, where))
        tests = pick(row, tests_field, where)
        if not isinstance(tests, list) or not tests:
            raise ValueError(f"{where}: tests must be a non-empty list, got {tests!r:.80}")
        if all(isinstance(t, dict) and set(t) == {"input", "output"} for t in tests):
            if all(isinstance(t["input"], str) and isinstance(t["output"], str) for t in tests):
                return Prompt(i, text, tuple((t["input"], t["output"]) for t in tests), "io")
        elif all(isinstance(t, str | dict) and not (isinstance(t, dict) and "input" in t)
                 for t in tests):  # fmt: skip
            return Prompt(i, text, tuple(parse_check(t, where) for t in tests), "asserts")
        raise ValueError(
            f"{where}: tests must be all assert-style (strings, or call/exec objects: "
            'flowrl_async/tasks/checks.py) or all {"input": str, "output": str} objects'
        )

    # ---- verification ----

    def verify(self, prompt: Prompt, completion: str) -> Verdict:
        try:
            code = extract_code(completion)
            if not code.strip():
                return Verdict(self.wrong_reward, "no code")
            run = self._run(code, prompt, self.isolation)
            return self._judge(prompt, run, code.strip())
        except Exception as e:
            return Verdict(self.wrong_reward, f"sandbox error: {type(e).__name__}: {e}")

    def _judge(self, prompt: Prompt, run: Run, answer: str) -> Verdict:
        n = len(prompt.tests)
        results = {}
        for words in run.lines:
            if (words[0] == "test" and len(words) >= 3 and words[1].isascii()
                    and words[1].isdigit() and int(words[1]) < n):  # fmt: skip
                i = int(words[1])
                # one report per test: a second one (forged lines) fails it
                results[i] = i not in results and self._passed(prompt, i, words[2:])
        passed = sum(results.get(i, False) for i in range(n))
        kinds = {words[0] for words in run.lines}
        exit_codes = [words[1] for words in run.lines if words[0] == "exit" and len(words) > 1]
        if run.timed_out or f"-{int(signal.SIGXCPU)}" in exit_codes:
            info = "timeout"
        elif "memory" in kinds:
            info = "memory"
        elif "start" not in kinds:
            info = f"sandbox error: {run.raw.strip()[-200:] or 'no output'}"
        elif "crash" in kinds or "done" not in kinds:
            info = "crash"
        elif passed == n:
            info = "ok"
        else:
            info = f"failed {n - passed}/{n}"
        if info == "ok":
            reward = self.correct_reward
        elif self.all_or_nothing:
            reward = self.wrong_reward
        else:
            reward = self.wrong_reward + (self.correct_reward - self.wrong_reward) * passed / n
        return Verdict(reward, info, answer if info == "ok" else None)

    @staticmethod
    def _passed(prompt: Prompt, i: int, words: list[str]) -> bool:
        """One test's report against its expected result, here, outside the sandbox."""
        if prompt.kind == "io":
            return (
                words[0] == "out" and len(words) == 2 and _same_output(words[1], prompt.tests[i][1])
            )
        check = prompt.tests[i]
        if check.mode == "exec":
            return words == ["pass"]
        if words[0] != "value" or len(words) != 2:
            return False
        try:
            return passes(check, decode_value(words[1]))
        except (ValueError, TypeError, RecursionError):  # not a plain value; unhashable keys
            return False

    # ---- the sandbox ----

    def _commands(self, mode: str) -> tuple[list[str], list[str], int | None]:
        """(prefix for the supervisor, worker command, worker uid)."""
        if mode == "none":
            return [], [sys.executable, "-I", "-B", "-c", WORKER], None
        unshare = shutil.which("unshare")
        if not unshare:
            raise OSError("isolation needs the unshare program (util-linux)")
        spaces = ["--net", "--pid", "--mount", "--uts", "--ipc", "--fork", "--kill-child",
                  "--mount-proc"]  # fmt: skip
        worker = [runtime()[0], "-I", "-B", "-S", "-c", WORKER]  # stdlib only, from the runtime
        if mode == "user":
            return [unshare, "--user", "--map-root-user", *spaces], worker, None
        return [unshare, *spaces], worker, _UID_BASE + secrets.randbelow(_UID_SPAN)

    def _run(self, code: str, prompt: Prompt, mode: str, timeout_s: float | None = None) -> Run:
        prefix, worker, uid = self._commands(mode)
        tests = [[t.mode, t.source] if prompt.kind == "asserts" else t[0] for t in prompt.tests]
        nonce = secrets.token_hex(8)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        cpu = max(1, math.ceil(timeout_s))
        mem, fsize = self.memory_mb * 2**20, self.max_file_mb * 2**20
        limits = {
            "RLIMIT_CPU": (cpu, cpu + 1),
            "RLIMIT_AS": (mem, mem),
            "RLIMIT_NPROC": (self.max_processes, self.max_processes),
            "RLIMIT_FSIZE": (fsize, fsize),
            "RLIMIT_NOFILE": (64, 64),
            "RLIMIT_CORE": (0, 0),
        }
        work = {"nonce": nonce, "code": code, "kind": prompt.kind, "tests": tests,
                "limits": limits, "output_limit": self.output_limit_bytes}  # fmt: skip
        base_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        root = tempfile.mkdtemp(prefix="flowrl-code-")
        try:
            home = root if mode == "none" else "/tmp"
            job = {"nonce": nonce, "mount": mode != "none", "uid": uid, "disk_mb": self.disk_mb,
                   "worker": worker, "work": work, "binds": runtime()[1],
                   "env": {**base_env, "HOME": home, "TMPDIR": home}}  # fmt: skip
            with open(os.path.join(root, "job.json"), "w") as f:
                json.dump(job, f)
            with tempfile.TemporaryFile() as channel:
                proc = subprocess.Popen(
                    [*prefix, sys.executable, "-I", "-B", "-c", SUPERVISOR, root],
                    stdin=subprocess.DEVNULL,
                    stdout=channel,
                    stderr=channel,
                    env=base_env,
                    cwd=root,
                    start_new_session=True,
                )
                timed_out = False
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    stop(proc)
                finally:
                    kill_group(proc.pid)  # stragglers (isolation "none")
                    proc.wait()
                channel.seek(0)
                raw = channel.read(fsize + self.output_limit_bytes * 2).decode(errors="replace")
        finally:
            shutil.rmtree(root, ignore_errors=True)
        lines = [line.split()[1:] for line in raw.splitlines() if line.startswith(nonce + " ")]
        return Run([words for words in lines if words], timed_out, raw)

    def _choose_isolation(self, isolation: str) -> str:
        modes = {"auto": ["root", "user"], "root": ["root"], "user": ["user"], "none": ["none"]}
        if isolation not in modes:
            raise ValueError(f"isolation must be one of {sorted(modes)}, got {isolation!r}")
        if isolation == "user" and os.geteuid() == 0:
            raise ValueError(
                "isolation 'user' started by root would run the code as the host's uid 0 "
                "(namespaced, without capabilities, but still uid 0): use 'root' (what auto "
                "picks for root), which runs it under a fresh unprivileged uid"
            )
        root = os.geteuid() == 0
        candidates = [m for m in modes[isolation] if (m == "root") == root or m == "none"]
        for mode in candidates:
            if self._probe(mode):
                return mode
        raise RuntimeError(
            f"code sandbox: isolation {isolation!r} does not work here (needs unshare "
            "from util-linux, and namespaces the kernel allows); isolation: none runs the code "
            "with resource limits only (unsafe for untrusted code)"
        )

    def _probe(self, mode: str) -> bool:
        key = f"{mode}:{sys.executable}"
        with _probe_lock:
            if key not in _probed:
                probe = Prompt(-1, "", (parse_check("assert f() == 1", "probe"),), "asserts")
                try:
                    run = self._run("def f():\n    return 1\n", probe, mode, timeout_s=30.0)
                    verdict = self._judge(probe, run, "")
                    _probed[key] = verdict.info == "ok"
                    if verdict.info != "ok":
                        log.info("code sandbox: isolation %r unusable: %s", mode, verdict.info)
                except Exception as e:
                    log.info("code sandbox: isolation %r unusable: %s", mode, e)
                    _probed[key] = False
            return _probed[key]


def _same_output(encoded: str, expected: str) -> bool:
    try:
        got = "" if encoded == "-" else base64.b64decode(encoded, validate=True)
    except ValueError:  # not what the worker writes: a forged line
        return False
    return _norm(got if isinstance(got, str) else got.decode("utf-8", "replace")) == _norm(expected)


def _norm(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines
