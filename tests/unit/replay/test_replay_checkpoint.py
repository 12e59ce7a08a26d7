"""Replay checkpoints: a restart from checkpoint + later log records gives exactly the state
of a server that never restarted, and the same as replaying the whole log."""

import shutil
import threading
import time
from pathlib import Path

import msgpack
import pytest

from flowrl_async.replay.client import ReplayClient
from flowrl_async.replay.server import ReplayServer, ServerConfig
from flowrl_async.replay.service import ReplayService
from flowrl_async.wire import WireError, group_to_wire

from factories import make_group

# uniform with 2 uses each, capacity 4 (so capacity evictions happen), staleness bound 1,
# and a rate limiter wide enough never to hold anything (its counters are state too)
SETTINGS = dict(
    capacity=4,
    max_staleness=1,
    selector="uniform",
    max_times_sampled=2,
    samples_per_insert=1,
    min_size_to_sample=2,
    error_buffer=100,
)


class Running:
    def __init__(self, directory):
        self.server = ReplayServer(ServerConfig(str(directory), "tcp://127.0.0.1:0", **SETTINGS))
        self.thread = threading.Thread(target=self.server.serve, daemon=True)
        self.thread.start()
        while self.server.bound_address is None:
            time.sleep(0.01)
        self.client = ReplayClient(self.server.bound_address, request_timeout_s=2.0, max_retries=2)

    def stop(self) -> dict:
        """Stop serving; -> the final state."""
        self.client.close()
        self.server.stop()
        self.thread.join(5)
        return self.server.state.snapshot()


def before_checkpoint(c):
    """Five records: adm, 3 ins, smp."""
    assert c.admit(actor_id=1, k=2) == [0, 1]
    for gid in "abc":
        c.insert(make_group(gid, actor_id=1, cursor=0 if gid == "a" else -1))
    assert len(c.sample(2, version=0)) == 2  # two of a, b, c, once each (they stay)
    c.insert(make_group("a"))  # a duplicate: logs nothing, a runtime counter only


def after_checkpoint(c):
    """Six records: 2 ins, ver + smp, adm, rel."""
    c.insert(make_group("d", version=1))
    c.insert(make_group("e", version=2))  # capacity 4: a (the oldest) goes
    # version 2 evicts b and c (staleness 2 > 1), then one of d, e is sampled (it stays)
    assert len(c.sample(1, version=2)) == 1
    # (1 + 2 + 1)·8 = 32 allowed − (5 accepted − 2 stale + 1 in flight) = 28 free
    assert c.admit(actor_id=2, k=1) == [2]
    c.release(actor_id=1)  # position 1 is handed out again


def test_restart_from_checkpoint_equals_a_server_that_never_restarted(tmp_path):
    directory = tmp_path / "replay"
    live = Running(directory)
    before_checkpoint(live.client)
    info = live.client.checkpoint(tag="step-3")
    segment = directory / "seg-00000001.log"
    # it covers the whole log so far: 3 ins + adm + smp records (the duplicate logs nothing)
    assert (info["segment"], info["offset"]) == (1, segment.stat().st_size)
    assert info["path"] == str(
        directory / "checkpoints" / f"ckpt-00000001-{info['offset']:012d}-step-3.ckpt"
    )
    after_checkpoint(live.client)
    never_restarted = live.stop()
    assert never_restarted["limiter"] == [5, 3]  # 5 inserts, 2 + 1 groups sampled
    assert len(never_restarted["entries"]) == 2  # d and e: a, b, c evicted (used/stale/full)

    resumed = Running(directory)
    stats = resumed.client.stats()
    assert stats["recovered_checkpoint"] == info["path"]
    assert stats["recovered_records"] == 6  # only the records after the checkpoint
    assert stats["duplicates"] == 0  # counted since the process started
    resumed.client.insert(make_group("f", version=2))
    after_resume = resumed.stop()
    assert after_resume["entries"][:2] == never_restarted["entries"]
    # minus the one new insert, the resumed state is the never-restarted one
    legacy = sorted([*never_restarted["dedup"]["legacy"], "f"])
    expected = {**never_restarted, "dedup": {**never_restarted["dedup"], "legacy": legacy}}
    expected["counters"] = {**expected["counters"], "inserted": 6}
    expected["limiter"] = [6, 3]
    assert {**after_resume, "entries": after_resume["entries"][:2]} == expected

    # the whole log without the checkpoint gives the same state
    replayed_dir = tmp_path / "replayed"
    shutil.copytree(directory, replayed_dir)
    shutil.rmtree(replayed_dir / "checkpoints")
    replayed = Running(replayed_dir)
    assert replayed.client.stats()["recovered_records"] == 5 + 6 + 1
    assert replayed.stop() == after_resume


def test_a_damaged_newest_checkpoint_falls_back_to_an_older_one(tmp_path):
    directory = tmp_path / "replay"
    live = Running(directory)
    before_checkpoint(live.client)
    older = live.client.checkpoint()
    after_checkpoint(live.client)
    newer = live.client.checkpoint(tag="newer")
    final = live.stop()
    assert older["path"].endswith(f"ckpt-00000001-{older['offset']:012d}.ckpt")
    with open(newer["path"], "r+b") as f:  # flip a byte of the state frame
        f.seek(-10, 2)
        byte = f.read(1)
        f.seek(-10, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    (directory / "checkpoints" / ".ckpt-x.ckpt.tmp").write_bytes(b"half written")
    (directory / "checkpoints" / "ckpt-99999999-000000000000.ckpt").write_bytes(b"junk")
    resumed = Running(directory)
    stats = resumed.client.stats()
    assert (stats["recovered_checkpoint"], stats["recovered_records"]) == (older["path"], 6)
    assert resumed.stop() == final


def test_a_log_shorter_than_its_checkpoint_continues_in_a_new_segment(tmp_path):
    directory = tmp_path / "replay"
    live = Running(directory)
    before_checkpoint(live.client)
    info = live.client.checkpoint()
    at_checkpoint = live.stop()
    segment = directory / "seg-00000001.log"
    with open(segment, "r+b") as f:  # lose the tail the checkpoint covers (a bad disk)
        f.truncate(info["offset"] - 10)
    resumed = Running(directory)
    stats = resumed.client.stats()
    # reading starts at the checkpoint's offset, past the end of the shortened segment
    assert (stats["recovered_records"], stats["recovery_torn_bytes"]) == (0, 0)
    resumed.client.insert(make_group("g"))  # goes to seg-00000002, after the checkpoint
    after = resumed.stop()
    assert (directory / "seg-00000002.log").exists()
    again = Running(directory)
    assert again.client.stats()["recovered_records"] == 1
    assert again.stop() == after
    assert after["dedup"]["legacy"] == sorted([*at_checkpoint["dedup"]["legacy"], "g"])


def test_checkpoint_to_an_explicit_path_is_a_copy_recovery_ignores(tmp_path):
    server = ReplayServer(ServerConfig(str(tmp_path / "replay"), **SETTINGS))
    server.handle("insert", {"group": group_to_wire(make_group("x"))})
    info = server.checkpoint(tmp_path / "elsewhere.ckpt")
    size = (tmp_path / "replay" / "seg-00000001.log").stat().st_size
    assert (info["path"], info["segment"], info["offset"]) == (
        str(tmp_path / "elsewhere.ckpt"),
        1,
        size,
    )
    server.log.close()
    again = ReplayServer(ServerConfig(str(tmp_path / "replay"), **SETTINGS))
    assert (again.recovered_checkpoint, again.recovery.records) == ("", 1)
    assert again.state.snapshot() == server.state.snapshot()
    again.log.close()


def test_the_service_wrapper_checkpoints_on_its_serving_thread(tmp_path):
    service = ReplayService(ServerConfig(str(tmp_path / "replay"), "tcp://127.0.0.1:0"))
    try:
        info = service.checkpoint(tag="learner-step-7")
        assert info["path"].endswith("ckpt-00000000-000000000000-learner-step-7.ckpt")  # empty
    finally:
        service.stop()


def big_group(gid: str) -> dict:
    return group_to_wire(make_group(gid, n=8, tokens=2000))  # ~128 KB on the wire


def test_a_checkpoint_holds_groups_by_their_place_in_the_log_and_stays_small(tmp_path):
    directory = tmp_path / "replay"
    server = ReplayServer(ServerConfig(str(directory), max_staleness=None, selector="uniform"))
    for i in range(20):
        server.handle("insert", {"group": big_group(f"g{i}")})
    kind, reply = server.handle("sample", {"batch_size": 3, "version": 0, "req": "r1"})
    sent = list(reply["groups"])
    info = server.checkpoint()
    log_bytes = (directory / "seg-00000001.log").stat().st_size
    ckpt_bytes = Path(info["path"]).stat().st_size
    assert log_bytes > 20 * 128_000 and ckpt_bytes < 4_000  # not a copy of the groups
    snapshot = server.state.snapshot()
    assert all(e[2][2:] == [e[0]] for e in snapshot["entries"])  # [segment, offset, id]
    server.log.close()

    again = ReplayServer(ServerConfig(str(directory), max_staleness=None, selector="uniform"))
    assert (again.recovered_checkpoint, again.recovery.records) == (info["path"], 0)
    assert again.state.snapshot() == snapshot
    for gid, entry in server.buffer.entries.items():  # the same bytes, read from the log
        assert again.buffer.entries[gid].payload == entry.payload
    # a retried sample gets the very bytes first sent
    assert (
        list(again.handle("sample", {"batch_size": 3, "version": 0, "req": "r1"})[1]["groups"])
        == sent
    )
    again.log.close()


def test_a_checkpoint_whose_group_record_is_damaged_gives_way_to_the_log(tmp_path):
    directory = tmp_path / "replay"
    server = ReplayServer(ServerConfig(str(directory), max_staleness=None, selector="uniform"))
    for i in range(5):
        server.handle("insert", {"group": big_group(f"g{i}")})
    info = server.checkpoint()
    seg, off = server.buffer.entries["g2"].where
    server.log.close()
    path = directory / f"seg-{seg:08d}.log"
    data = bytearray(path.read_bytes())
    data[off + 5000] ^= 0xFF  # inside g2's record
    path.write_bytes(bytes(data))
    again = ReplayServer(ServerConfig(str(directory), max_staleness=None, selector="uniform"))
    # the checkpoint cannot be restored without g2: recovery replays the whole log instead,
    # which skips and counts the damaged record and keeps the rest
    assert info["path"] and again.recovered_checkpoint == ""
    assert (again.recovery.records, again.recovery.corrupt_skipped) == (4, 1)
    assert list(again.buffer.entries) == ["g0", "g1", "g3", "g4"]
    again.log.close()


def test_prune_keeps_the_named_checkpoints_and_the_newest(tmp_path):
    directory = tmp_path / "replay"
    server = ReplayServer(ServerConfig(str(directory), max_staleness=None))
    made = []
    for i in range(4):
        server.handle("insert", {"group": group_to_wire(make_group(f"g{i}"))})
        made.append(Path(server.handle("checkpoint", {"tag": f"step-{i}"})[1]["path"]))
    kind, reply = server.handle("prune", {"keep": [str(made[1]), made[2].name]})
    assert (kind, reply) == ("pruned", {"deleted": [made[0].name]})
    kind, reply = server.handle("prune", {"keep": []})  # the newest always stays
    assert sorted(reply["deleted"]) == sorted([made[1].name, made[2].name])
    assert [p.name for p in (directory / "checkpoints").iterdir()] == [made[3].name]
    with pytest.raises(WireError, match="a list of checkpoint file names"):
        server.handle("prune", {"keep": "all"})
    server.log.close()


def test_a_checkpoint_left_ahead_of_a_shortened_log_never_restores_other_groups(tmp_path):
    """The log loses its tail after a checkpoint's fsync, cutting a record the checkpoint
    refers to: recovery replays the whole log instead, and later records go to a new
    segment, never to the places the checkpoint's records had (found by review: same-size
    groups written there made the checkpoint restore one group's bytes under another id)."""
    directory = tmp_path / "replay"
    server = ReplayServer(ServerConfig(str(directory), max_staleness=None))
    for gid in ("a1", "a2"):
        server.handle("insert", {"group": group_to_wire(make_group(gid))})
    info = server.checkpoint(tag="x")
    segment, offset = server.buffer.entries["a2"].where
    server.log.close()
    with open(directory / f"seg-{segment:08d}.log", "r+b") as f:
        f.truncate(offset + 10)  # inside a2's record
    server = ReplayServer(ServerConfig(str(directory), max_staleness=None))
    assert server.recovered_checkpoint == "" and list(server.buffer.entries) == ["a1"]
    for gid in ("b2", "b3"):  # the same size as a2: they would land where it was
        server.handle("insert", {"group": group_to_wire(make_group(gid))})
    assert all(e.where[0] == segment + 1 for gid, e in server.buffer.entries.items() if gid != "a1")
    server.log.close()
    again = ReplayServer(ServerConfig(str(directory), max_staleness=None))
    assert again.recovered_checkpoint == ""  # still cannot restore: a2's record is gone
    assert Path(info["path"]).exists()
    groups = {gid: msgpack.unpackb(e.payload)["id"] for gid, e in again.buffer.entries.items()}
    assert groups == {"a1": "a1", "b2": "b2", "b3": "b3"}
    again.log.close()


def test_a_reference_to_a_record_of_another_group_is_refused(tmp_path):
    from flowrl_async.replay.buffer import ReplayBuffer
    from flowrl_async.replay.log import SegmentLog
    from flowrl_async.replay.state import ReplayState

    directory = tmp_path / "replay"
    server = ReplayServer(ServerConfig(str(directory), max_staleness=None))
    for gid in ("a", "b"):
        server.handle("insert", {"group": group_to_wire(make_group(gid))})
    snapshot = server.state.snapshot()
    server.log.close()
    snapshot["entries"][0][2][:2] = snapshot["entries"][1][2][:2]  # a's ref -> b's record
    state = ReplayState(ReplayBuffer(max_staleness=None))
    with pytest.raises(ValueError, match="holds group 'b', not 'a'"):
        state.restore(snapshot, SegmentLog(directory).read_at)
    with pytest.raises(ValueError, match="restore it with read_log"):
        state.restore(snapshot)


def test_a_format_1_checkpoint_holding_group_bytes_still_restores(tmp_path, monkeypatch):
    """Checkpoints written before groups were held by reference (format 1: each group's
    bytes inline) restore as they are; the next checkpoint is format 2."""
    from flowrl_async.replay import checkpoint as ckpt

    directory = tmp_path / "replay"
    server = ReplayServer(ServerConfig(str(directory), max_staleness=None, selector="uniform"))
    for gid in ("a", "b", "c"):
        server.handle("insert", {"group": group_to_wire(make_group(gid))})
    server.handle("sample", {"batch_size": 2, "version": 0, "req": "r1"})
    old = server.state.snapshot()
    for entry in old["entries"]:
        entry[2] = server.buffer.entries[entry[0]].payload  # inline, as format 1 held them
    for answer in old["answers"]:
        answer[1] = list(server.state.answers[answer[0]][0])
    monkeypatch.setattr(ckpt, "FORMAT", 1)
    path = directory / "checkpoints" / ckpt.default_name(server.log.position(), "old")
    server.log.sync()
    ckpt.write(path, old, server.log.position())
    monkeypatch.undo()
    server.log.close()
    again = ReplayServer(ServerConfig(str(directory), max_staleness=None, selector="uniform"))
    assert again.recovered_checkpoint == str(path)
    assert ckpt.read_header(path)["format"] == 1
    for gid, entry in server.buffer.entries.items():
        assert again.buffer.entries[gid].payload == entry.payload
    assert (
        again.handle("sample", {"batch_size": 2, "version": 0, "req": "r1"})[1]["groups"]
        == (server.state.answers["r1"][0])
    )
    new = again.checkpoint(tag="new")
    assert ckpt.read_header(Path(new["path"]))["format"] == 2
    again.log.close()
