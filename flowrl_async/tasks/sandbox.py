"""The code sandbox's programs and process handling (the task that uses them, and the rules
of what a candidate may do, are in ``flowrl_async/tasks/code.py``): the supervisor that
becomes PID 1 of the new namespaces, the worker that runs the candidate under its limits, and
the helpers that stop them."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# The supervisor: PID 1 of the new namespaces (or a plain child with isolation "none"). It
# reads the job, makes every mount read-only, mounts a tmpfs as the working directory, starts
# the worker, feeds it the job on stdin and reports the worker's exit status.
SUPERVISOR = r"""
import ctypes, json, os, re, subprocess, sys
d = sys.argv[1]
with open(os.path.join(d, "job.json"), "rb") as f:
    job = json.load(f)
os.unlink(os.path.join(d, "job.json"))
def say(*words):
    os.write(1, (" ".join([job["nonce"], *map(str, words)]) + "\n").encode())
if job["mount"]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    def mount(source, target, fstype, flags, data):
        if libc.mount(source, target.encode(), fstype, flags, data) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), target)
    keep = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048,
            "relatime": 1 << 21, "strictatime": 1 << 24}
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        flags = 1 | 32 | 4096 | sum(keep.get(o, 0) for o in fields[5].split(","))
        try:  # MS_RDONLY | MS_REMOUNT | MS_BIND, keeping the flags a user namespace locks
            mount(None, target, None, flags, None)
        except OSError:
            if target == "/":
                raise
    owner = "" if job["uid"] is None else ",uid=%d,gid=%d" % (job["uid"], job["uid"])
    mount(b"tmpfs", d, b"tmpfs", 2 | 4, b"size=%dm,mode=0700%s" % (job["disk_mb"], owner.encode()))
os.chdir(d)
worker = subprocess.Popen(job["worker"], stdin=subprocess.PIPE, env=job["env"])
try:
    worker.stdin.write(json.dumps(job["work"]).encode())
    worker.stdin.close()
except OSError:
    pass
say("exit", worker.wait())
"""

# The worker: drops to the limits, hides stdio from the code, runs the code and the tests and
# writes one line per result (prefixed with the nonce) to its original stdout.
WORKER = r"""
import base64, io, json, os, resource, sys
job = json.loads(sys.stdin.buffer.read())
nonce = job["nonce"]
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 0)
res = os.dup(1)
os.dup2(null, 1)
os.dup2(null, 2)
def say(*words):
    os.write(res, (" ".join([nonce, *map(str, words)]) + "\n").encode())
for name, (soft, hard) in job["limits"].items():
    which = getattr(resource, name)
    ceiling = resource.getrlimit(which)[1]
    if ceiling != resource.RLIM_INFINITY:
        soft, hard = min(soft, ceiling), min(hard, ceiling)
    resource.setrlimit(which, (soft, hard))
say("start")
def memory():
    say("memory")
    os._exit(0)
try:
    code = compile(job["code"], "solution.py", "exec")
except MemoryError:
    memory()
except BaseException as e:
    say("crash", type(e).__name__)
    os._exit(0)
if job["kind"] == "asserts":
    scope = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(code, scope)
    except MemoryError:
        memory()
    except BaseException as e:
        say("crash", type(e).__name__)
        os._exit(0)
    for i, test in enumerate(job["tests"]):
        try:
            exec(compile(test, "test_%d" % i, "exec"), scope)
            say("test", i, "pass")
        except MemoryError:
            memory()
        except BaseException as e:
            say("test", i, "fail", type(e).__name__)
else:
    cap = job["output_limit"]
    class Capped(io.BytesIO):
        def write(self, b):
            if self.tell() + len(b) > cap:
                raise OSError("output limit")
            return super().write(b)
    for i, data in enumerate(job["tests"]):
        out = Capped()
        sys.stdin = io.TextIOWrapper(io.BytesIO(data.encode()), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
        failed = None
        try:
            exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
        except SystemExit as e:
            if e.code not in (None, 0):
                failed = "SystemExit"
        except MemoryError:
            memory()
        except BaseException as e:
            failed = type(e).__name__
        try:
            sys.stdout.flush()
        except BaseException as e:
            failed = failed or type(e).__name__
        if failed:
            say("test", i, "fail", failed)
        else:
            say("test", i, "out", base64.b64encode(out.getvalue()).decode() or "-")
say("done")
os._exit(0)
"""


@dataclass
class Run:
    """What one sandboxed run reported."""

    lines: list[list[str]]  # result lines without the nonce
    timed_out: bool
    raw: str  # the channel's text, for sandbox errors


def interpreter_public() -> bool:
    """Can a stranger run this interpreter: every directory on the way searchable by others?"""
    paths = {Path(sys.executable).resolve(), Path(sys.prefix), Path(sys.base_prefix)}
    for path in paths:
        for d in [path, *path.parents]:
            try:
                mode = d.stat().st_mode
            except OSError:
                return False
            if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
                return False
    return True


def stop(proc: subprocess.Popen) -> None:
    """Kill the supervisor first, so ``unshare`` reaps it (a supervisor orphaned by killing the
    group would linger as a zombie until init reaps it); its exit waits for the kernel to kill
    every process left in its PID namespace. Then kill whatever is left in the group."""
    try:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            children = [int(pid) for pid in f.read().split()]
    except OSError:
        children = []
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        pass


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
