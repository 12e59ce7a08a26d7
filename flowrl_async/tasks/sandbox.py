"""The code sandbox's programs and process handling (the task that uses them, and the rules
of what a candidate may do, are in ``flowrl_async/tasks/code.py``): the supervisor that
becomes PID 1 of the new namespaces, the worker that runs the candidate under its limits, and
the helpers that stop them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass

# The supervisor: PID 1 of the new namespaces (or a plain child with isolation "none"). It
# reads the job, builds the candidate's private root (a read-only tmpfs holding only the
# Python runtime and the system libraries, read-only; /dev/null, zero, random, urandom; a
# /proc of this PID namespace; a size-capped tmpfs at /tmp), pivots into it and detaches the
# host's file system, makes itself non-dumpable, starts the worker with every capability
# dropped (below), feeds it the job on stdin and reports the worker's exit status.
SUPERVISOR = r"""
import ctypes, json, os, re, subprocess, sys
import _posixsubprocess, selectors, signal, errno  # imported before the host files go
d = sys.argv[1]
with open(os.path.join(d, "job.json"), "rb") as f:
    job = json.load(f)
os.unlink(os.path.join(d, "job.json"))
def say(*words):
    os.write(1, (" ".join([job["nonce"], *map(str, words)]) + "\n").encode())
libc = ctypes.CDLL(None, use_errno=True)
def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)
libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
check(libc.prctl(4, 0, 0, 0, 0), "PR_SET_DUMPABLE")  # /proc/1 and ptrace: the kernel's only
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
    signal.signal(sig, signal.SIG_DFL)  # PID 1: signals from inside with no handler are dropped
CAPS = int(open("/proc/sys/kernel/cap_last_cap").read()) if job["mount"] else 0  # read now:
# the candidate's /proc has no /proc/sys
if job["mount"]:
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    def mount(source, target, fstype, flags, data=None):
        check(libc.mount(source, target.encode(), fstype, flags, data), target)
    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC = 1, 2, 4, 8, 32, 4096, 16384
    keep = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048,
            "relatime": 1 << 21, "strictatime": 1 << 24}
    with open("/proc/self/mountinfo") as f:
        mounts = [(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), l.split()[4]),
                   sum(keep.get(o, 0) for o in l.split()[5].split(","))) for l in f]
    def locked(path):  # the flags of the mount holding path (a user namespace locks them)
        best = max((m for m in mounts if path == m[0] or path.startswith(m[0].rstrip("/") + "/")),
                   key=lambda m: len(m[0]))
        return best[1]
    new = os.path.join(d, "root")
    os.mkdir(new)
    mount(b"tmpfs", new, b"tmpfs", NOSUID | NODEV, b"size=16m,mode=0755")
    def inside(path):
        return os.path.join(new, path.lstrip("/"))
    for path, kind in job["binds"]:  # the runtime, read-only
        target = inside(path)
        if kind.startswith("link:"):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(kind[5:], target)
            continue
        if kind == "dir":
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "w").close()
        mount(path.encode(), target, None, BIND | REC)
        mount(None, target, None, BIND | REMOUNT | RDONLY | NOSUID | NODEV | locked(path))
    os.makedirs(inside("/dev"))
    for name in ("null", "zero", "random", "urandom"):  # devices: bound, kept writable
        open(inside("/dev/" + name), "w").close()
        mount(("/dev/" + name).encode(), inside("/dev/" + name), None, BIND)
    with open("/proc/self/mountinfo") as f:  # submounts of the binds: read-only too
        below = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), l.split()[4])
                 for l in f]
    for target in below:
        if target.startswith(new + "/") and not target.startswith(inside("/dev") + "/"):
            mount(None, target, None, BIND | REMOUNT | RDONLY | NOSUID | NODEV | locked(target))
    os.mkdir(inside("/proc"))
    try:  # its own processes only, and none of /proc/sys and the rest (kernel 5.8 on)
        mount(b"proc", inside("/proc"), b"proc", RDONLY | NOSUID | NODEV | NOEXEC,
              b"hidepid=2,subset=pid")
    except OSError:
        mount(b"proc", inside("/proc"), b"proc", RDONLY | NOSUID | NODEV | NOEXEC, b"hidepid=2")
    os.mkdir(inside("/tmp"))
    owner = "" if job["uid"] is None else ",uid=%d,gid=%d" % (job["uid"], job["uid"])
    mount(b"tmpfs", inside("/tmp"), b"tmpfs", NOSUID | NODEV | NOEXEC,
          b"size=%dm,mode=0700%s" % (job["disk_mb"], owner.encode()))
    os.mkdir(inside("/.old"))
    mount(None, new, None, BIND | REMOUNT | RDONLY | NOSUID | NODEV)  # the new / itself
    os.chdir(new)
    number = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
    check(libc.syscall(number[os.uname().machine], b".", b".old"), "pivot_root")
    os.chroot(".")
    check(libc.umount2(b"/.old", 2), "umount /.old")  # MNT_DETACH: the host is gone
os.chdir("/tmp" if job["mount"] else d)
def drop():  # in the worker, before exec: nothing it could use comes back
    check(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    if not job["mount"]:
        return
    for cap in range(CAPS + 1):
        check(libc.prctl(24, cap, 0, 0, 0), "PR_CAPBSET_DROP")  # the bounding set
    check(libc.prctl(47, 4, 0, 0, 0), "PR_CAP_AMBIENT_CLEAR_ALL")
    # securebits: no caps for uid 0 at exec, none kept across setuid, no ambient raise; locked
    check(libc.prctl(28, 0x01 | 0x02 | 0x20 | 0x40 | 0x80, 0, 0, 0), "PR_SET_SECUREBITS")
    if job["uid"] is not None:
        os.setgroups([])
        os.setresgid(job["uid"], job["uid"], job["uid"])
        os.setresuid(job["uid"], job["uid"], job["uid"])
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # capset v3, this process: all sets empty
    check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")
worker = subprocess.Popen(job["worker"], stdin=subprocess.PIPE, env=job["env"], preexec_fn=drop)
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
    # plain values only, by exact type, with references taken before the code runs; the
    # code can still rewrite anything in this process, but a value it forges must equal
    # an expected value it never sees (the comparison is in the caller)
    # a value is sent as its plain content, read through the base types' own methods (a
    # subclass's overrides never run: a Counter goes as a dict, a namedtuple as a tuple, an
    # int subclass with an always-true __eq__ as its number), with references taken before
    # the code runs; anything else fails. The code can still rewrite anything here, but a
    # value it forges must equal an expected value it never sees (compared in the caller)
    T, B64, DUMPS, MRO = type, base64.b64encode, json.dumps, type.__dict__["__mro__"].__get__
    BASES = ((bool, "b"), (int, "i"), (float, "f"), (str, "s"), (type(None), "n"),
             (list, "l"), (tuple, "t"), (dict, "d"), (frozenset, "F"), (set, "S"))
    LIST_ITER, TUPLE_ITER, SET_ITER, FSET_ITER = list.__iter__, tuple.__iter__, set.__iter__, frozenset.__iter__
    ITEMS, HEX, FHEX, STR = dict.items, int.__format__, float.hex, str.__getitem__
    def plain(v, depth=0):
        mro = MRO(T(v))
        tag = next((t for base, t in BASES if base in mro), None)
        if tag is None or depth > 64:
            raise TypeError("not a plain value")
        if tag == "b":
            return [tag, v is True or int.__index__(v) != 0]
        if tag == "i":
            return [tag, HEX(v, "x")]
        if tag == "f":
            return [tag, FHEX(v)]
        if tag == "s":
            return [tag, STR(v, slice(None))]
        if tag == "n":
            return [tag]
        if tag == "d":
            return [tag, [[plain(k, depth + 1), plain(x, depth + 1)] for k, x in ITEMS(v)]]
        items = {"l": LIST_ITER, "t": TUPLE_ITER, "S": SET_ITER, "F": FSET_ITER}[tag](v)
        return [tag, [plain(x, depth + 1) for x in items]]
    scope = {"__name__": "solution", "__builtins__": __builtins__}
    tests = [(mode, compile(src, "test_%d" % i, "eval" if mode == "value" else "exec"))
             for i, (mode, src) in enumerate(job["tests"])]
    try:
        exec(code, scope)
    except MemoryError:
        memory()
    except BaseException as e:
        say("crash", type(e).__name__)
        os._exit(0)
    for i, (mode, test) in enumerate(tests):
        try:
            if mode == "value":
                encoded = B64(DUMPS(plain(eval(test, scope))).encode()).decode()
                say("test", i, "value", encoded)
            else:
                exec(test, scope)
                say("test", i, "pass")
        except MemoryError:
            memory()
        except BaseException as e:
            say("test", i, "fail", T(e).__name__)
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


SYSTEM_LIBS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64")


def runtime() -> tuple[str, list[list[str]]]:
    """(the interpreter, the paths the candidate's root holds, read-only): this Python's
    installation (``sys.base_prefix``: its binary, standard library and shared library; not
    a virtual environment's packages) and the system library directories, each as
    ``[path, "dir" | "file" | "link:<target>"]`` (a symlink is made again as one)."""
    python = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    if not python.startswith(prefix + os.sep):  # a virtual environment's own copy
        python = os.path.join(prefix, "bin", f"python{sys.version_info[0]}.{sys.version_info[1]}")
    binds: list[list[str]] = []
    for path in SYSTEM_LIBS:
        if os.path.islink(path):
            binds.append([path, "link:" + os.readlink(path)])
        elif os.path.isdir(path):
            binds.append([path, "dir"])
    if prefix in ("/usr", "/"):  # a system Python: its binary (its library is under /usr/lib)
        binds.append([python, "file"])
    elif not any(prefix == p or prefix.startswith(p + "/") for p, kind in binds if kind == "dir"):
        binds.append([prefix, "dir"])
    return python, binds


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
