"""Rewinding the replay service to a learner checkpoint's replay checkpoint (``rewind``):
sampling state back to the checkpoint, every group and prompt position handed out since
kept, and a restart from the log after the rewind gives the same state."""

import uuid
from pathlib import Path

import msgpack
import pytest

from flowrl_async.replay.server import ReplayServer, ServerConfig
from flowrl_async.wire import WireError, group_to_wire

from factories import make_group

BASE = dict(selector="fifo", max_staleness=None)  # each group once, no staleness bound
# a rate limiter wide enough never to hold anything here (its counters are state too)
LIMITER = dict(samples_per_insert=1.0, min_size_to_sample=4, error_buffer=100)


def ids(spec: str) -> list[str]:
    """ids("g0..g3") == ["g0", "g1", "g2", "g3"]; ids("g7") == ["g7"]."""
    first, _, last = spec.partition("..")
    lo = int(first[1:])
    return [f"g{i}" for i in range(lo, int((last or first)[1:]) + 1)]


class Script:
    """Runs rows of ops on a ReplayServer; checkpoints are known by their tag."""

    def __init__(self, directory, **settings):
        self.directory, self.settings = directory, {**BASE, **settings}
        self.server = self.start()
        self.checkpoints: dict[str, str] = {}

    def start(self) -> ReplayServer:
        return ReplayServer(ServerConfig(str(self.directory), **self.settings))

    def restart(self) -> ReplayServer:
        self.server.log.close()
        self.server = self.start()
        return self.server

    def ins(self, spec: str, version: int = 0) -> None:
        for gid in ids(spec):
            group = group_to_wire(make_group(gid, version=version))
            assert self.server.handle("insert", {"group": group}) == (
                "ack",
                {"group_id": gid, "duplicate": False},
            )

    def smp(self, n: int, version: int, req: str | None = None) -> list[str]:
        msg = {"batch_size": n, "version": version, "req": req or uuid.uuid4().hex}
        kind, reply = self.server.handle("sample", msg)
        assert kind == "batch"
        return [msgpack.unpackb(g)["id"] for g in reply["groups"]]

    def run(self, op: str, arg=None, version: int = 0):
        if op == "ins":
            return self.ins(arg, version)
        if op == "ver":
            return self.server.handle("version", {"version": arg})
        if op == "ckpt":
            self.checkpoints[arg] = self.server.checkpoint(tag=arg)["path"]
            return None
        if op == "smp":
            return self.smp(arg, version)
        assert op == "rwd"
        kind, reply = self.server.handle("rewind", {"checkpoint": self.checkpoints[arg]})
        assert kind == "rewound"
        return reply


def dispatch(server) -> tuple:
    s = server.state
    return s.cursor, s.outstanding, s.redo, s.buffer.seen, s.buffer.counters.inserted


# Each row: ops (name, argument, version), then what the buffer holds after the last one
# (FIFO order), the learner version, counters and the row's server settings. "smp" ops
# check the FIFO ids they got.
ROWS = [
    pytest.param(
        # the brief's case: 10 in, checkpoint at version 2, 4 sampled at version 3 (used up),
        # 2 more in; the rewind offers the 4 again, keeps the 2, and goes back to version 2
        [("ins", "g0..g9"), ("ver", 2), ("ckpt", "a"), ("smp", 4, 3, "g0..g3"),
         ("ins", "g10..g11", 3), ("rwd", "a")],
        "g0..g11", 2,
        dict(inserted=12, sampled_groups=0, evicted_used=0), LIMITER,
        id="sampled-since-offered-again",
    ),
    pytest.param(
        # a second rewind to the same checkpoint undoes the samples since the first
        [("ins", "g0..g9"), ("ckpt", "a"), ("smp", 4, 1, "g0..g3"), ("rwd", "a"),
         ("smp", 2, 0, "g0..g1"), ("ins", "g10"), ("rwd", "a")],
        "g0..g10", 0,
        dict(inserted=11, sampled_groups=0, evicted_used=0), {},
        id="rewound-twice",
    ),
    pytest.param(
        # rewinds to a later, then an earlier checkpoint; the later rwd record lies between
        # the earlier checkpoint and now and is skipped like the samples
        [("ins", "g0..g5"), ("ckpt", "a"), ("smp", 2, 1, "g0..g1"), ("ckpt", "b"),
         ("smp", 2, 2, "g2..g3"), ("rwd", "b"), ("smp", 2, 2, "g2..g3"), ("rwd", "a")],
        "g0..g5", 0,
        dict(inserted=6, sampled_groups=0, evicted_used=0), {},
        id="nested",
    ),
    pytest.param(
        # only the samples after the checkpoint are undone: g0, g1 stay used
        [("ins", "g0..g5"), ("smp", 2, 1, "g0..g1"), ("ckpt", "a"),
         ("smp", 2, 2, "g2..g3"), ("rwd", "a")],
        "g2..g5", 1,
        dict(inserted=6, sampled_groups=2, evicted_used=2), {},
        id="samples-before-the-checkpoint-stay",
    ),
    pytest.param(
        # staleness bound 1: version 2 evicted g0..g3 as stale after the checkpoint; back at
        # version 0 they are not stale, so they are held again (g4, from version 2, too)
        [("ins", "g0..g3"), ("ckpt", "a"), ("ver", 2), ("ins", "g4", 2), ("rwd", "a")],
        "g0..g4", 0,
        dict(inserted=5, evicted_stale=0), dict(max_staleness=1),
        id="stale-since-held-again",
    ),
    pytest.param(
        # capacity 4 still rules: g0, g1 come back, then g4, g5 push the oldest out (counted)
        [("ins", "g0..g3"), ("ckpt", "a"), ("smp", 2, 0, "g0..g1"), ("ins", "g4..g5"),
         ("rwd", "a")],
        "g2..g5", 0,
        dict(inserted=6, sampled_groups=0, evicted_used=0, evicted_capacity=2),
        dict(capacity=4),
        id="capacity",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("ops", "held", "version", "counters", "settings"), ROWS)
def test_rewind_table(tmp_path, ops, held, version, counters, settings):
    script = Script(tmp_path / "replay", **settings)
    for op, arg, *rest in ops:
        version_arg = rest[0] if rest else 0
        kept = dispatch(script.server)
        got = script.run(op, arg, version_arg)
        if op == "rwd":  # acknowledged groups and the work handed out are as they were
            assert dispatch(script.server) == kept
        if op == "smp":
            assert got == ids(rest[1]), (op, arg)
    server = script.server
    assert list(server.buffer.entries) == ids(held)
    assert server.buffer.version == version
    c = server.stats()
    assert {k: c[k] for k in counters} == counters
    # every acknowledged group is held, used or evicted (for room or as stale)
    gone = c["evicted_used"] + c["evicted_stale"] + c["evicted_capacity"]
    assert c["inserted"] == c["size"] + gone
    if "limiter_samples" in c:  # its sample count is the checkpoint's, its inserts all
        assert (c["limiter_inserts"], c["limiter_samples"]) == (12, 0)
    assert server.state.answers == {}  # answers went to the learner being replaced

    # a restart recovers from the newest checkpoint (before the rewind) and the log after
    # it, the rwd record included: the same state
    rewound = server.state.snapshot()
    assert script.restart().state.snapshot() == rewound
    assert script.server.stats()["recovery_rewind_errors"] == 0
    # the learner goes on: FIFO hands out every held group once, and a restart agrees
    batch = 4 if "samples_per_insert" in settings else 1  # the limiter needs >= 4 held
    drained = [gid for _ in range(len(ids(held)) // batch) for gid in script.smp(batch, version)]
    assert drained == ids(held)[: len(drained)]
    trained = script.server.state.snapshot()
    assert script.restart().state.snapshot() == trained


def test_rewind_keeps_the_prompt_positions_handed_out_since(tmp_path):
    script = Script(tmp_path / "replay", max_staleness=1, groups_per_version=4)
    s = script.server
    assert s.handle("admit", {"actor": 1, "k": 2}) == ("admitted", {"n": 2, "positions": [0, 1]})
    script.run("ckpt", "a")
    assert s.handle("admit", {"actor": 2, "k": 3}) == (
        "admitted",
        {"n": 3, "positions": [2, 3, 4]},
    )
    group = group_to_wire(make_group("x", actor_id=2, cursor=3))  # position 3 came back
    s.handle("insert", {"group": group})
    s.handle("release", {"actor": 1})  # actor 1 restarted: 0, 1 are handed out again
    script.smp(1, 0)
    script.run("rwd", "a")
    assert (s.state.cursor, s.state.redo) == (5, [0, 1])
    assert {a: sorted(p) for a, p in s.state.outstanding.items()} == {2: [2, 4]}
    assert list(s.buffer.entries) == ["x"]  # sampled after the checkpoint: offered again
    # (1 + 0 + 1)·4 = 8 allowed − (1 accepted + 2 in flight) = 5 free: the redo positions
    # first, then new ones; nothing handed out since the checkpoint is handed out again
    assert s.handle("admit", {"actor": 3, "k": 4})[1]["positions"] == [0, 1, 5, 6]
    again = script.restart()
    assert again.state.snapshot() == s.state.snapshot()


def test_rewind_errors_change_nothing(tmp_path):
    script = Script(tmp_path / "replay")
    script.run("ins", "g0..g3")
    script.run("ckpt", "a")
    script.run("smp", 2, 0)
    before = script.server.state.snapshot()
    for bad in ("../../etc/passwd", "ckpt-00000009-000000000000.ckpt", "", "seg-00000001.log"):
        with pytest.raises(WireError):
            script.server.handle("rewind", {"checkpoint": bad})
    with pytest.raises(WireError):
        script.server.handle("rewind", {})
    assert script.server.state.snapshot() == before
    # a damaged checkpoint is refused too
    path = script.checkpoints["a"]
    with open(path, "r+b") as f:
        f.seek(-5, 2)
        f.write(b"\xff\xff\xff\xff\xff")
    with pytest.raises(WireError, match="no intact checkpoint"):
        script.run("rwd", "a")
    assert script.server.state.snapshot() == before


def test_a_rewind_whose_checkpoint_is_gone_is_reported_by_recovery(tmp_path):
    script = Script(tmp_path / "replay")
    script.run("ins", "g0..g3")
    script.run("ckpt", "a")
    assert script.run("smp", 2, 0) == ["g0", "g1"]
    name = Path(script.checkpoints["a"]).name
    assert script.run("rwd", "a") == {"checkpoint": name, "version": 0, "size": 4}
    script.run("ckpt", "after")  # covers the rwd record: recovery starts here
    rewound = script.server.state.snapshot()
    assert script.restart().state.snapshot() == rewound
    # without any checkpoint the rwd record cannot be redone: counted, the state keeps the
    # samples (as before rewinds existed), nothing acknowledged is lost
    for path in (tmp_path / "replay" / "checkpoints").iterdir():
        path.unlink()
    server = script.restart()
    stats = server.stats()
    assert (stats["recovery_rewind_errors"], stats["recovery_corrupt_skipped"]) == (1, 0)
    assert list(server.buffer.entries) == ["g2", "g3"]
    assert stats["inserted"] == stats["size"] + stats["evicted_used"] == 4


def test_prune_keeps_a_checkpoint_that_a_rewind_record_names(tmp_path):
    # before: prune deleted it, and a recovery from the whole log (every later checkpoint
    # damaged) could no longer redo the rewind: the samples since came back as used
    script = Script(tmp_path / "replay")
    script.run("ins", "g0..g3")
    script.run("ckpt", "a")
    assert script.run("smp", 2, 0) == ["g0", "g1"]
    script.run("rwd", "a")
    script.run("ckpt", "b")
    script.run("ckpt", "c")
    script.server.handle("prune", {"keep": []})
    left = {p.name for p in (tmp_path / "replay" / "checkpoints").iterdir()}
    assert left == {Path(script.checkpoints[t]).name for t in ("a", "c")}  # a: the rwd's
    rewound = script.server.state.snapshot()
    assert script.restart().state.snapshot() == rewound  # from c: still names a
    (tmp_path / "replay" / "checkpoints" / Path(script.checkpoints["c"]).name).unlink()
    server = script.restart()  # from a, then the whole log after it: the rwd is redone
    assert server.stats()["recovery_rewind_errors"] == 0
    assert list(server.buffer.entries) == ["g0", "g1", "g2", "g3"]
