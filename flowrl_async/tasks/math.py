"""Math problems with one gold answer each, checked with math-verify.

Rows come from JSONL or Parquet (see ``datafiles``): a problem field (``problem`` or
``question`` by default) and a gold field (``answer`` or ``solution``); a gold text that holds a
``\\boxed{...}`` (a worked solution) is reduced to its last boxed answer. The final answer of a
completion is its last ``\\boxed{...}`` (braces balanced; an unclosed last box counts as no
box), else its last ``Answer: ...`` line; a completion that boxes two different answers
(``\\boxed{3} ... \\boxed{4}``) is wrong ("several answers"), and a box holding several
(``3 \\text{ or } 4``, ``3, 4``) is compared as one expression, which equals no single gold
answer; math-verify then decides whether it equals the gold
answer (``\\frac{1}{2}`` = ``0.5`` = ``1/2``, ``x=3`` = ``3``, ``5\\text{ cm}`` = ``5``).

Invariants: ``verify`` never raises: no answer, an unparsable answer, a timeout or a checker
crash give ``wrong_reward`` and a reason ("no answer", "wrong", "parse error: ...",
"timeout", ...); only "ok" earns ``correct_reward``. Prompt ids are row indices (train file
first, then ``eval_path``), stable for the same files.

Threads: math-verify bounds its own time with SIGALRM, which works only in the main thread,
and a pathological answer (``9^{9^{9^{9}}}``) can hold the GIL in one huge integer operation
that no signal interrupts. So by default (``isolate=True``) the checking runs in a child
process, in its main thread, with its own signal timeouts and a memory limit; a hard deadline
kills and restarts the child. Any thread may call ``verify``; calls are serialised per task.
With ``isolate=False`` math-verify runs in-process (signal timeouts in the main thread only,
none elsewhere).
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from flowrl_async.tasks.datafiles import PROJECT_ROOT, Verdict, load_split, text_field

DEFAULT_TEMPLATE = "{prompt}\n\nReason step by step and put the final answer in \\boxed{}."


@dataclass(frozen=True)
class Prompt:
    """One math problem and its gold answer."""

    prompt_id: int
    text: str
    answer: str  # the gold answer (LaTeX or plain)


_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_LINE = re.compile(
    r"^[ \t>*_#]*(?:final[ \t]+)?answer[ \t*_]*[:：][ \t*_]*(.*?)[ \t]*$", re.I | re.M
)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``; None if absent or its braces never close."""
    boxes = all_boxed(text)
    return boxes[-1] if boxes else None


def all_boxed(text: str) -> list[str | None]:
    """The content of every ``\\boxed{...}`` in order (None for one whose braces never
    close)."""
    out = []
    for start in _BOX.finditer(text):
        depth, i, content = 1, start.end(), None
        while i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                content = text[start.end() : i].strip()
                break
            i += 1
        out.append(content)
    return out


def several_answers(text: str) -> bool:
    """The rule against hedging: a completion that boxes more than one distinct answer
    (contents compared with whitespace removed) has no single final answer and is wrong,
    whichever box holds the gold one; boxing the same answer twice is fine."""
    boxes = {re.sub(r"\s+", "", b) for b in all_boxed(text) if b is not None}
    return len(boxes) > 1


def extract_answer(text: str) -> str | None:
    """The final answer: last boxed, else last ``Answer:`` line; surrounding ``$`` and a
    trailing period are dropped. None when there is none (or it is empty)."""
    answer = last_boxed(text)
    if answer is None:
        lines = _ANSWER_LINE.findall(text)
        answer = lines[-1] if lines else None
    if answer is None:
        return None
    answer = answer.strip().rstrip(".").strip().strip("$").strip()
    return answer or None


@lru_cache(maxsize=4096)
def _parse(text: str, timeout: int | None) -> tuple:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    for wrapped in (f"${text}$", f"\\boxed{{{text}}}", text):
        found = parse(wrapped, config, fallback_mode="no_fallback", parsing_timeout=timeout)
        if found:
            return tuple(found)
    return ()


def _plain(text: str) -> str:
    return re.sub(r"\s+", "", text).strip("$")


def check_answer(gold: str, answer: str, timeout: int | None = None) -> str:
    """ "ok", "wrong", "parse error: ...", "timeout" or "memory": never raises.

    ``timeout`` (whole seconds, SIGALRM) must be None off the main thread."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    try:
        if _plain(gold) == _plain(answer):
            return "ok"
        gold_parsed = _parse(gold, timeout)
        if not gold_parsed:
            return "wrong"  # gold that math-verify cannot read: exact text only
        parsed = _parse(answer, timeout)
        if not parsed:
            return f"parse error: {answer[:40]!r}"
        ok = verify(list(gold_parsed), list(parsed), timeout_seconds=timeout)
        return "ok" if ok else "wrong"
    except TimeoutException:
        return "timeout"
    except MemoryError:
        return "memory"
    except Exception as e:
        return f"parse error: {type(e).__name__}: {str(e)[:60]}"


def serve(timeout: int, memory_mb: int) -> None:
    """The checker child: one JSON request per stdin line, one JSON outcome per stdout line."""
    import logging
    import resource

    logging.disable(logging.WARNING)  # math-verify logs every timeout and parse failure
    limit = memory_mb * 2**20
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError):
        pass
    out = sys.stdout.buffer
    check_answer("1", "\\frac{2}{2}", timeout)  # import and warm sympy before "ready"
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        outcome = check_answer(request["gold"], request["answer"], timeout)
        out.write(json.dumps({"outcome": outcome}).encode() + b"\n")
        out.flush()


class _Checker:
    """A math-verify child process; started on first use, restarted after a kill."""

    def __init__(self, timeout_s: float, memory_mb: int, startup_s: float = 120.0):
        self.timeout = max(1, int(round(timeout_s)))
        self.hard_timeout = 3 * self.timeout + 2.0  # gold parse + answer parse + verify
        self.memory_mb, self.startup_s = memory_mb, startup_s
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._lock = threading.Lock()

    def check(self, gold: str, answer: str) -> str:
        with self._lock:
            try:
                if self._proc is not None and self._proc.poll() is not None:
                    self.close_locked()  # died since the last call: start afresh
                if self._proc is None:
                    self._start()
                request = json.dumps({"gold": gold, "answer": answer}).encode() + b"\n"
                self._proc.stdin.write(request)
                self._proc.stdin.flush()
                return json.loads(self._readline(self.hard_timeout))["outcome"]
            except TimeoutError:
                self.close_locked()
                return "timeout"
            except Exception as e:
                self.close_locked()
                return f"checker error: {type(e).__name__}: {e}"

    def _start(self) -> None:
        code = (
            f"import sys; sys.path.insert(0, {str(PROJECT_ROOT)!r}); "
            f"from flowrl_async.tasks.math import serve; serve({self.timeout}, {self.memory_mb})"
        )
        self._buf = b""
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # no terminal signals; it exits on EOF when we die
        )
        if self._readline(self.startup_s) != b"ready":
            raise RuntimeError("math checker did not start")

    def _readline(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError(f"math checker exited (rc {self._proc.poll()})")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def close_locked(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                stream.close()

    def close(self) -> None:
        with self._lock:
            self.close_locked()

    def __del__(self):
        try:
            self.close_locked()
        except Exception:
            pass


class MathTask:
    """Math problems from a data file, verified with math-verify in a child process."""

    name = "math"

    def __init__(
        self,
        path: str,
        eval_path: str | None = None,
        held_out_fraction: float = 0.1,
        seed: int = 0,
        problem_field: str | Sequence[str] = ("problem", "question"),
        answer_field: str | Sequence[str] = ("answer", "solution"),
        prompt_template: str = DEFAULT_TEMPLATE,
        correct_reward: float = 1.0,
        wrong_reward: float = 0.0,
        timeout_s: float = 5.0,
        memory_mb: int = 4096,
        isolate: bool = True,
    ):
        """``prompt_template``: ``{prompt}`` is replaced by the problem, nothing else is
        touched. ``eval_path``: held-out problems from their own file (then every row of
        ``path`` trains and ``held_out_fraction`` is unused)."""

        def make(i: int, where: str, row: dict) -> Prompt:
            return self._prompt(i, where, row, problem_field, answer_field, prompt_template)

        self.train_prompts, self.eval_prompts = load_split(
            path, eval_path, held_out_fraction, seed, make
        )
        self.correct_reward, self.wrong_reward = correct_reward, wrong_reward
        self.timeout_s, self.memory_mb, self.isolate = timeout_s, memory_mb, isolate
        self._checker = _Checker(timeout_s, memory_mb)  # starts its process on first use

    @staticmethod
    def _prompt(i, where, row, problem_field, answer_field, template) -> Prompt:
        problem = text_field(row, problem_field, where)
        gold = text_field(row, answer_field, where)
        answer = extract_answer(gold) if "\\boxed" in gold or "\\fbox" in gold else gold.strip()
        if not answer:
            raise ValueError(f"{where}: no usable gold answer in {gold[:80]!r}")
        text = template.replace("{prompt}", problem)
        return Prompt(i, text, answer)

    def verify(self, prompt: Prompt, completion: str) -> Verdict:
        try:
            if several_answers(completion):
                return Verdict(self.wrong_reward, "several answers")
            answer = extract_answer(completion)
            if answer is None:
                return Verdict(self.wrong_reward, "no answer")
            outcome = self._check(prompt.answer, answer)
            reward = self.correct_reward if outcome == "ok" else self.wrong_reward
            return Verdict(reward, outcome, answer)
        except Exception as e:  # belt and braces: the checks above already catch
            return Verdict(self.wrong_reward, f"verifier error: {type(e).__name__}: {e}")

    def _check(self, gold: str, answer: str) -> str:
        if not self.isolate:
            main = threading.current_thread() is threading.main_thread()
            return check_answer(gold, answer, max(1, round(self.timeout_s)) if main else None)
        return self._checker.check(gold, answer)

    def close(self) -> None:
        """Stop the checker child (it also exits by itself when this process dies)."""
        self._checker.close()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_checker"}  # a process

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._checker = _Checker(self.timeout_s, self.memory_mb)
