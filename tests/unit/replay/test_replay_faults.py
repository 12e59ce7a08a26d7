"""Faults a SIGKILL does not model (a lost log tail, failed writes, power loss) and peers
that lie: each test here failed before its fix."""

import errno

import numpy as np
import pytest

from flowrl_async.replay.server import ReplayServer, ServerConfig
from flowrl_async.wire import WireError, group_to_wire

from factories import make_group


def server_at(directory, **settings) -> ReplayServer:
    settings.setdefault("max_staleness", None)
    return ReplayServer(ServerConfig(str(directory), **settings))


def insert(server, gid, **group):
    return server.handle("insert", {"group": group_to_wire(make_group(gid, **group))})


def test_groups_acknowledged_after_a_roll_past_a_lost_tail_survive_the_next_restart(tmp_path):
    # segments of 200 bytes: group a fills segment 1, admissions fill segments 2 to 4, and
    # the checkpoint covers a place in the last; then segments 2+ are lost (a bad disk)
    directory = tmp_path / "replay"
    server = server_at(directory, segment_bytes=200)
    insert(server, "a")
    for _ in range(12):
        server.handle("admit", {"actor": 1, "k": 1})
    info = server.checkpoint()
    server.log.close()
    assert info["segment"] >= 3
    for seg in server.log.segments():
        if server.log.index(seg) >= 2:
            seg.unlink()
    # the checkpoint still restores (a's record is in segment 1); g is acknowledged after
    resumed = server_at(directory, segment_bytes=200)
    assert resumed.recovered_checkpoint == info["path"]
    assert insert(resumed, "g") == ("ack", {"group_id": "g", "duplicate": False})
    # before the fix g went to segment 2, below the checkpoint's: the next start, reading
    # from the checkpoint's place, never saw it
    assert resumed.buffer.entries["g"].where[0] > info["segment"]
    resumed.log.close()
    again = server_at(directory, segment_bytes=200)
    assert set(again.buffer.entries) == {"a", "g"}
    again.log.close()


# ---------------------------------------------------------------- failed writes and fsyncs

FULL_DISK = r"""
import resource, signal, sys
sys.path.insert(0, "tests")
from factories import make_group
from flowrl_async.replay.server import ReplayServer, ServerConfig
from flowrl_async.wire import WireError, group_to_wire

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
server = ReplayServer(ServerConfig(sys.argv[1], max_staleness=None, fsync="never"))
insert = lambda gid: server.handle("insert", {"group": group_to_wire(make_group(gid))})
insert("a")
size = server.log.position()[1]
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 50, hard))  # b's record does not fit
try:
    insert("b")
    sys.exit("b was acknowledged on a full disk")
except OSError as e:
    print("b refused:", e.errno)
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space again
insert("c")
server.log.close()
"""


def test_an_append_that_failed_on_a_full_disk_never_reaches_the_log(tmp_path):
    # a real failed write (the file size limit: EFBIG after 50 of b's bytes); before the
    # fix the buffered writer kept b's other bytes and wrote them with c, so recovery found
    # b, a group whose insert had failed, and served it
    import subprocess
    import sys

    directory = tmp_path / "replay"
    run = subprocess.run([sys.executable, "-c", FULL_DISK, str(directory)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"b refused: {errno.EFBIG}" in run.stdout
    again = server_at(directory)
    assert set(again.buffer.entries) == {"a", "c"}
    assert again.recovery.corrupt_skipped == 0 and again.recovery.torn_bytes_truncated == 0
    again.log.close()


def failing(real, errno_, calls: set):
    """``real`` that raises OSError(errno_) on the calls numbered in ``calls`` (from 1)."""
    count = [0]

    def wrapped(*args):
        count[0] += 1
        if count[0] in calls:
            raise OSError(errno_, f"injected {errno.errorcode[errno_]}")
        return real(*args)

    return wrapped


def test_a_failed_fsync_of_its_own_append_is_undone_and_the_log_goes_on(tmp_path, monkeypatch):
    from flowrl_async.replay import log as log_module

    directory = tmp_path / "replay"
    server = server_at(directory, fsync="always")
    insert(server, "a")
    monkeypatch.setattr(log_module, "fsync", failing(log_module.fsync, errno.EIO, {1}))
    with pytest.raises(OSError, match="injected EIO"):
        insert(server, "b")  # not acknowledged: its bytes are truncated away, fsynced
    assert "b" not in server.buffer.entries and server.log.failed is None
    insert(server, "c")
    assert server.stats()["log_write_errors"] == 1
    server.log.close()
    again = server_at(directory)
    assert set(again.buffer.entries) == {"a", "c"}
    again.log.close()


def test_a_failed_background_fsync_stops_acknowledging(tmp_path, monkeypatch):
    # with fsync=interval, records already acknowledged may be gone from the page cache
    # after a failed fsync: the log fails, no insert is acknowledged any more, and the
    # serving loop stops so that a restart recovers from the disk
    import threading
    import time

    from flowrl_async.replay import log as log_module
    from flowrl_async.replay.log import LogFailed

    directory = tmp_path / "replay"
    server = server_at(directory, fsync="interval", fsync_interval_ms=1.0)
    insert(server, "a0")  # the segment exists (its directory fsynced)
    deadline = time.monotonic() + 5
    while server.log.dirty and time.monotonic() < deadline:  # a0's own fsync is done
        time.sleep(0.005)
    monkeypatch.setattr(log_module, "fsync", failing(log_module.fsync, errno.EIO, {1, 2, 3}))
    insert(server, "a")  # acknowledged; its background fsync fails
    deadline = time.monotonic() + 5
    while server.log.failed is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.log.failed is not None and server.stats()["log_failed"]
    with pytest.raises(LogFailed, match="restart the service"):
        insert(server, "b")
    serving = threading.Thread(target=server.serve, daemon=True)
    serving.start()
    serving.join(5)
    assert not serving.is_alive()  # it stopped by itself
    monkeypatch.undo()
    again = server_at(directory)
    assert set(again.buffer.entries) <= {"a0", "a"} and "b" not in again.buffer.entries
    again.log.close()


# ---------------------------------------------------------------- power loss


class PowerLoss:
    """Records what fsync made durable (each file's synced size, by inode; each directory's
    entries when it was fsynced) through the log's I/O seam; ``crash`` leaves on disk only
    that: files whose name no directory fsync covered are gone, the rest are cut to their
    last fsynced size (0 if never fsynced)."""

    def __init__(self, monkeypatch, root):
        import os

        from flowrl_async.replay import log as log_module

        self.root, self.synced = root, {}
        # what existed before is durable (the run's directory was made by someone else)
        self.entries = {os.path.realpath(d): set(ds) | set(fs) for d, ds, fs in os.walk(root)}
        real_fsync = log_module.fsync

        def fsync(fd):
            real_fsync(fd)
            st = os.fstat(fd)
            self.synced[st.st_ino] = st.st_size

        def fsync_dir(path):
            real_fsync_dir(path)
            self.entries[str(os.path.realpath(path))] = set(os.listdir(path))

        real_fsync_dir = log_module.fsync_dir
        monkeypatch.setattr(log_module, "fsync", fsync)
        monkeypatch.setattr(log_module, "fsync_dir", fsync_dir)

    def crash(self):
        import os
        import shutil

        for directory, dirs, files in os.walk(self.root, topdown=True):
            durable = self.entries.get(os.path.realpath(directory))
            for name in list(dirs):
                if durable is None or name not in durable:
                    shutil.rmtree(os.path.join(directory, name))
                    dirs.remove(name)
            for name in files:
                path = os.path.join(directory, name)
                if durable is None or name not in durable:
                    os.unlink(path)
                else:
                    os.truncate(path, self.synced.get(os.stat(path).st_ino, 0))


def test_with_fsync_always_every_acknowledged_group_survives_power_loss(tmp_path, monkeypatch):
    # before the fix no directory but checkpoints/ was ever fsynced: after power loss the
    # segment files (and the replay directory's name itself) could be gone
    power = PowerLoss(monkeypatch, tmp_path)
    directory = tmp_path / "run" / "replay"
    server = server_at(directory, fsync="always", segment_bytes=600)
    acknowledged = []
    for i in range(6):
        insert(server, f"a{i}")
        acknowledged.append(f"a{i}")
        if i == 2:
            server.checkpoint()
    server.log.close()
    power.crash()
    resumed = server_at(directory, fsync="always", segment_bytes=600)
    assert set(resumed.buffer.entries) == set(acknowledged)
    for i in range(4):  # more groups after the restart, into new segments, then again
        insert(resumed, f"b{i}")
        acknowledged.append(f"b{i}")
    resumed.log.close()
    power.crash()
    again = server_at(directory, fsync="always", segment_bytes=600)
    assert set(again.buffer.entries) == set(acknowledged)
    assert len(again.log.segments()) > 2  # the groups spread over several segments
    again.log.close()


SERVICE_WITH_FAILING_DISK = r"""
import errno, sys, time
sys.path.insert(0, "tests")
from factories import make_group
from flowrl_async.replay import log
from flowrl_async.replay.client import ReplayClient
from flowrl_async.replay.server import ServerConfig
from flowrl_async.replay.service import ReplayService

service = ReplayService(ServerConfig(sys.argv[1], max_staleness=None, fsync="interval"))
client = ReplayClient(service.address(), max_retries=1)
client.insert(make_group("a"))  # its segment exists; from here every fsync fails

def broken(fd):
    raise OSError(errno.EIO, "injected")

log.fsync = broken
try:  # acknowledged, or refused if a's background fsync already failed
    client.insert(make_group("b"))
except Exception as e:
    print("b:", e)
time.sleep(30)  # the service ends the process (status 70) well before this
sys.exit("still alive")
"""


def test_the_service_process_exits_for_a_restart_when_its_log_fails(tmp_path):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", SERVICE_WITH_FAILING_DISK, str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 70, run.stderr[-3000:]
    assert "log failed, exiting for a restart" in run.stderr


# ---------------------------------------------------------------- messages that lie


def test_a_bogus_version_is_refused_and_changes_nothing(tmp_path):
    # before: version 2**63 evicted every group and refused every actor, persisted
    server = server_at(tmp_path / "r", max_staleness=1)
    insert(server, "a")
    for bogus in (2**63, -1, 1001):  # 1001: more than max_version_jump above 0
        with pytest.raises(WireError, match="refused"):
            server.handle("version", {"version": bogus})
    assert server.buffer.version == 0 and set(server.buffer.entries) == {"a"}
    assert server.handle("version", {"version": 1000}) == ("version", {"version": 1000})
    server.log.close()
    assert server_at(tmp_path / "r", max_staleness=1).buffer.version == 1000


def test_the_version_may_follow_the_newest_stored_group(tmp_path):
    # offline training: preloaded groups are 5000 versions old; the learner continues after
    server = server_at(tmp_path / "r")
    insert(server, "old", version=5000)
    assert server.handle("version", {"version": 5001})[1]["version"] == 5001
    server.log.close()


def test_an_oversized_admission_is_refused(tmp_path):
    server = server_at(tmp_path / "r", max_staleness=1, max_admit=16)
    with pytest.raises(WireError, match=r"k=100000000 must be in \[0, 16\]"):
        server.handle("admit", {"actor": 1, "k": 10**8})
    assert server.state.in_flight == 0
    assert server.handle("admit", {"actor": 1, "k": 2})[1]["n"] == 2
    server.log.close()


def poison(kind: str) -> dict:
    import numpy as np

    from flowrl_async.wire import pack_array

    wire = group_to_wire(make_group(kind))
    if kind == "int64_prompt":
        wire["prompt"] = pack_array(np.array([1, 20, 21], dtype=np.int64))
    elif kind == "negative_id":
        wire["responses"][0]["tok"] = pack_array(np.array([10, -3, 12], dtype=np.int32))
    elif kind == "beyond_vocab":
        wire["responses"][1]["tok"] = pack_array(np.array([10, 11, 100], dtype=np.int32))
    return wire


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("int64_prompt", "prompt token ids must be int32"),
        ("negative_id", r"response 0: token ids must be in \[0, 100\), got \[-3, 12\]"),
        ("beyond_vocab", r"response 1: token ids must be in \[0, 100\), got \[10, 100\]"),
    ],
)
def test_poison_groups_are_refused_on_insert(tmp_path, kind, reason):
    # before: they passed and crashed the learner's embedding lookup, on every resume too
    server = server_at(tmp_path / "r", vocab_size=100)
    with pytest.raises(WireError, match=reason):
        server.handle("insert", {"group": poison(kind)})
    assert len(server.buffer) == 0
    server.log.close()


def test_poison_groups_already_stored_are_dropped_on_recovery(tmp_path):
    # logged (and checkpointed) by a service that did not know the vocabulary: a restart
    # that knows it drops them, from the checkpoint and from the log after it
    from flowrl_async.wire import check_group

    directory = tmp_path / "r"
    server = server_at(directory)
    insert(server, "fine")
    server.handle("insert", {"group": poison("beyond_vocab") | {"id": "in_checkpoint"}})
    server.checkpoint()
    server.handle("insert", {"group": poison("beyond_vocab") | {"id": "after_it"}})
    server.log.close()
    assert check_group(poison("beyond_vocab"))  # without a vocabulary it is a valid group
    again = server_at(directory, vocab_size=100)
    assert set(again.buffer.entries) == {"fine"}
    assert again.state.dropped_on_restore == 1 and again.recovery.corrupt_skipped == 1
    again.log.close()


def test_the_run_tells_its_service_the_models_vocabulary(tmp_path):
    import json

    from flowrl_async.config import TrainConfig
    from flowrl_async.model import build_tiny_model
    from flowrl_async.run.processes import replay_config

    model = build_tiny_model(tmp_path / "m")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    cfg = replay_config(TrainConfig(), tmp_path, "tcp://127.0.0.1:0", str(model))
    assert cfg.vocab_size == vocab
    assert ReplayServer(cfg).limits.vocab_size == vocab


def test_two_servers_never_share_a_log_directory(tmp_path):
    import os

    first = server_at(tmp_path / "r")
    with pytest.raises(RuntimeError, match=f"in use by pid {os.getpid()}: one server"):
        server_at(tmp_path / "r")
    first.log.close()  # released: a restart takes it
    server_at(tmp_path / "r").log.close()


# ---------------------------------------------------------------- sizes, end to end


def test_a_message_of_nested_empty_lists_is_refused_before_it_fills_memory():
    from flowrl_async.wire import decode

    # an array of 4,096 arrays of 1,023 empty arrays: 4 MiB, ~4.2 M Python lists (the
    # review measured 289 MB and 2.5 s for such a message)
    inner = b"\xdc\x03\xff" + b"\x90" * 1023
    bomb = b"\x83" + b"\xa1v\x01\xa1t\xa5stats\xa1x" + b"\xdd" + (4096).to_bytes(4, "big")
    bomb += inner * 4096
    assert len(bomb) > 4 * 2**20
    with pytest.raises(WireError, match="too many lists and maps"):
        decode(bomb)


def test_array_shapes_and_echoed_values_are_bounded():
    import numpy as np

    from flowrl_async.wire import WireLimits, pack_array, unpack_array

    a = pack_array(np.zeros(0, np.int32))
    for shape in ([0, 2**64 - 1], [0] * 9):  # no elements, yet no numpy shape either
        with pytest.raises(WireError, match="bad shape"):
            unpack_array({**a, "sh": shape}, "tok", WireLimits())
    with pytest.raises(WireError) as e:
        unpack_array({**a, "dt": "x" * 100_000}, "tok", WireLimits())
    assert len(str(e.value)) < 200  # the peer's 100 kB are not echoed


def test_a_batch_too_big_for_a_reply_is_refused_before_it_is_logged(tmp_path):
    # before: logged as sampled, then refused by the client's decoder, on every retry
    from flowrl_async.wire import WireLimits

    limits = WireLimits(max_message_bytes=400_000)  # replies carry 350 kB of groups
    server = ReplayServer(ServerConfig(str(tmp_path / "r"), max_staleness=None), limits)
    for gid in ("a", "b"):  # ~262 kB each: one fits a reply, two do not
        insert(server, gid, n=8, tokens=4096)
    at = server.log.position()
    with pytest.raises(WireError, match="more than a reply may hold"):
        server.handle("sample", {"batch_size": 2, "version": 0, "req": "r1"})
    assert server.log.position() == at and server.stats()["sampled_groups"] == 0
    assert server.handle("sample", {"batch_size": 1, "version": 0, "req": "r2"})[0] == "batch"
    server.log.close()


def test_capacity_in_bytes_evicts_the_oldest_groups(tmp_path):
    server = server_at(tmp_path / "r")
    insert(server, "p")  # ids of one length: every group below has this size
    size = server.buffer.held_bytes
    server.log.close()
    server = server_at(tmp_path / "s", capacity_bytes=int(2.5 * size))
    for gid in ("a", "b", "c"):
        insert(server, gid)
    assert list(server.buffer.entries) == ["b", "c"]
    stats = server.stats()
    assert (stats["held_bytes"], stats["evicted_capacity"]) == (2 * size, 1)
    server.log.close()
    again = server_at(tmp_path / "s", capacity_bytes=int(2.5 * size))
    assert again.stats()["held_bytes"] == 2 * size
    again.log.close()


def test_zmq_drops_a_frame_larger_than_the_limit_without_decoding_it(tmp_path):
    import threading
    import time

    import zmq

    from flowrl_async.replay.client import ReplayClient
    from flowrl_async.wire import WireLimits

    server = ReplayServer(ServerConfig(str(tmp_path / "r"), "tcp://127.0.0.1:0"),
                          WireLimits(max_message_bytes=1 << 20))  # fmt: skip
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    while server.bound_address is None:
        time.sleep(0.01)
    peer = zmq.Context.instance().socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(server.bound_address)
    from flowrl_async.wire import decode, encode

    peer.send(b"\x00" * (4 << 20))  # 4 MiB: over twice the 1 MiB limit
    peer.send(encode("stats", rid=1))  # then an honest request on the same connection
    replies, deadline = [], time.monotonic() + 2.0
    while time.monotonic() < deadline and not any(m.get("rid") == 1 for _, m in replies):
        if peer.poll(100):
            replies.append(decode(peer.recv()))
    # without the limit the 4 MiB were received whole, decoded and answered "exceeds"
    assert not any(kind == "error" for kind, _ in replies), replies
    honest = ReplayClient(server.bound_address, request_timeout_s=2.0, max_retries=3)
    try:
        assert honest.stats()["rejected"] == 0  # dropped by zmq: never decoded, never counted
    finally:
        honest.close()
        peer.close(0)
        server.stop()
        thread.join(5)


# ---------------------------------------------------------------- rate limiter liveness


@pytest.mark.parametrize(
    "selector, settings",
    [
        ("fifo", {}),
        ("uniform", {"max_times_sampled": 2}),
        ("prioritized", {"max_times_sampled": 2}),
        ("mixed", {"max_times_sampled": 2, "fresh_fraction": 0.5}),
        ("mixed", {"max_times_sampled": 3, "fresh_fraction": 1.0}),
    ],
)
def test_inserts_and_samples_are_never_both_held(tmp_path, selector, settings):
    # random inserts at random versions (some stale on arrival), version rises and samples;
    # after the server has answered what it can, inserts and samples must never both wait
    # (nothing else would come: actors wait for their acks, the learner for its batch).
    # Before the fix: the mixed selector, or stale arrivals counted by the limiter, left both
    # held
    import random

    for seed in range(12):
        rng = random.Random(seed)
        server = ReplayServer(ServerConfig(
            str(tmp_path / f"{selector}-{seed}-{settings.get('fresh_fraction')}"),
            selector=selector, max_staleness=2, samples_per_insert=1.0, min_size_to_sample=4,
            error_buffer=4.0, capacity=12, **settings,
        ))  # fmt: skip
        server._send = lambda *a, **k: None  # replies go nowhere here
        version, n = 0, 0
        for step in range(150):
            op = rng.random()
            if op < 0.6:
                n += 1
                group = make_group(f"g{n}", version=max(0, version - rng.randint(0, 4)))
                server.handle("insert", {"group": group_to_wire(group), "timeout_ms": 10**6,
                                         "rid": n}, b"actor")  # fmt: skip
            elif op < 0.75:
                version += 1
                server.handle("version", {"version": version})
            else:
                server.handle("sample", {"batch_size": rng.randint(1, 4), "version": version,
                                         "req": f"s{step}", "timeout_ms": 10**6}, b"learner")  # fmt: skip
            server._serve_held()
            both = bool(server.held.inserts) and bool(server.held.samples)
            assert not both, f"seed {seed} step {step}: inserts and samples both held"
        server.log.close()


def test_a_plain_tcp_service_on_a_routable_address_is_refused_unless_insecure(tmp_path):
    # before: cluster mode bound the node's IP with CURVE off and no warning
    from flowrl_async.config import TrainConfig, validate
    from flowrl_async.net import node_ip

    host = node_ip()
    assert host != "127.0.0.1"
    server = ReplayServer(ServerConfig(str(tmp_path / "a"), f"tcp://{host}:0"))
    with pytest.raises(ValueError, match="without encryption or authentication"):
        server.bind()
    server.log.close()
    server = ReplayServer(ServerConfig(str(tmp_path / "b"), f"tcp://{host}:0", insecure=True))
    assert server.bind().startswith(f"tcp://{host}:")
    server._sock.close(0)
    server.log.close()
    cfg = TrainConfig()
    cfg.cluster.address = "ray://head:10001"
    with pytest.raises(ValueError, match="replay.insecure=true"):
        validate(cfg)
    cfg.replay.insecure = True
    validate(cfg)


# ---------------------------------------------------------------- bounded restart time


def test_the_service_checkpoints_itself_so_a_restart_replays_a_bounded_tail(tmp_path):
    # before: with no learner asking for checkpoints, a restart replayed the whole log
    # (17.5 minutes of recoveries over 100 restarts of a long run)
    directory = tmp_path / "r"
    server = server_at(directory, checkpoint_every_mb=0.01)  # every ~10 kB of log
    record = None
    for i in range(60):
        insert(server, f"g{i:03d}", tokens=64)
        record = record or server.log.appended_bytes  # one insert's bytes
        if i == 5:
            server.checkpoint(tag="step-5")  # the learner's: never deleted by the service
        server.maybe_checkpoint()
    names = sorted(p.name for p in (directory / "checkpoints").iterdir())
    own = [n for n in names if n.endswith("-auto.ckpt")]
    assert len(own) == 2 and len(names) == 3  # its newest two, and the learner's
    server.log.close()
    again = server_at(directory, checkpoint_every_mb=0.01)
    assert again.recovered_checkpoint.endswith("-auto.ckpt")
    assert len(again.buffer.entries) == 60
    assert again.recovery.records * record <= 0.01 * 2**20 + record  # at most ~10 kB
    again.log.close()


def test_held_requests_are_bounded(tmp_path):
    # before: any number of distinct held samples (each scanned every 10 ms) were kept
    server = server_at(tmp_path / "r", max_held=3, samples_per_insert=1.0,
                       min_size_to_sample=2, error_buffer=2.0)  # fmt: skip
    for i in range(3):  # nothing to sample yet: held
        assert server.handle("sample", {"batch_size": 1, "version": 0, "req": f"s{i}",
                                        "timeout_ms": 10**6}, b"l") is None  # fmt: skip
    assert server.handle("sample", {"batch_size": 1, "version": 0, "req": "s3",
                                    "timeout_ms": 10**6}, b"l") == ("empty", {})  # fmt: skip
    assert len(server.held.samples) == 3
    server.log.close()


def test_held_samples_are_tried_again_only_when_something_changed(tmp_path, monkeypatch):
    # before: every held sample was tried on every turn of the serving loop (every 10 ms)
    server = server_at(tmp_path / "r", max_held=100)
    for i in range(100):
        assert server.handle("sample", {"batch_size": 2, "version": 0, "req": f"s{i}",
                                        "timeout_ms": 10**6}, b"l") is None  # fmt: skip
    tries = []
    real = server._try_sample
    monkeypatch.setattr(server, "_try_sample", lambda *a: tries.append(a[2]) or real(*a))
    for _ in range(10):  # ten turns, nothing new: one pass over the 100
        server._serve_held()
    assert len(tries) == 100
    insert(server, "a")  # one group: still too few, so each is tried once more
    server._serve_held()
    server._serve_held()
    assert len(tries) == 200 and len(server.held.samples) == 100
    server._send = lambda *a, **k: None  # no socket here
    insert(server, "b")  # s0 gets both (fifo: used once), the other 99 wait on
    server._serve_held()
    assert "s0" not in server.held.samples and len(server.held.samples) == 99
    server.log.close()


def test_a_held_sample_answered_through_its_retry_is_never_served_again(tmp_path):
    # before: the held twin stayed and was served a second time (a second smp record: those
    # groups were used up and sent to a client that no longer waited)
    server = server_at(tmp_path / "r")
    server._send = lambda *a, **k: None
    msg = {"batch_size": 1, "version": 0, "req": "s0", "timeout_ms": 10**6}
    assert server.handle("sample", msg, b"old") is None  # held
    insert(server, "a")
    insert(server, "b")
    assert server.handle("sample", msg, b"new")[0] == "batch"  # the retry, answered at once
    server._serve_held()
    assert not server.held.samples and server.stats()["sampled_groups"] == 1
    assert list(server.buffer.entries) == ["b"]
    server.log.close()


def test_held_samples_are_all_tried_again_after_a_turn_that_failed(tmp_path, monkeypatch):
    server = server_at(tmp_path / "r")
    server._send = lambda *a, **k: None
    for req in ("s0", "s1"):
        server.handle("sample", {"batch_size": 1, "version": 0, "req": req, "timeout_ms": 10**6},
                      b"l")  # fmt: skip
    insert(server, "a")
    insert(server, "b")
    real, calls = server._try_sample, []

    def flaky(*a):
        calls.append(a[2])
        if len(calls) == 1:
            raise OSError("a transient failure")
        return real(*a)

    monkeypatch.setattr(server, "_try_sample", flaky)
    with pytest.raises(OSError):
        server._serve_held()
    server._serve_held()  # before: skipped (nothing changed since the failed turn)
    assert not server.held.samples and server.stats()["sampled_groups"] == 2
    server.log.close()


def test_a_group_no_reply_could_carry_and_an_absurd_group_version_are_refused(tmp_path):
    from flowrl_async.wire import WireLimits

    server = ReplayServer(ServerConfig(str(tmp_path / "r"), max_staleness=None),
                          WireLimits(max_message_bytes=400_000))  # fmt: skip
    with pytest.raises(WireError, match="could never be sampled"):
        insert(server, "big", n=16, tokens=4096)  # 524 kB: fits a message, never a reply
    insert(server, "a")  # the first group of a fresh service sets the scale
    with pytest.raises(WireError, match="more than 1000 ahead"):
        insert(server, "bogus", version=2**62)  # it would make version 2**62 acceptable
    assert server.buffer.newest_version == 0
    server.log.close()


def test_a_2d_token_array_is_rejected_not_an_internal_error():
    import numpy as np

    from flowrl_async.wire import group_from_wire, pack_array

    wire = group_to_wire(make_group("g"))
    wire["prompt"] = pack_array(np.array([[1, 2], [3, 4]], dtype=np.int32))
    with pytest.raises(WireError, match="1-D"):
        group_from_wire(wire)


def test_bool_flags_of_the_server_cli_parse_words():
    from flowrl_async.replay.config import parse_args

    assert parse_args(["--directory", "d", "--insecure", "false"], "x").insecure is False
    assert parse_args(["--directory", "d", "--insecure", "true"], "x").insecure is True
    with pytest.raises(SystemExit):
        parse_args(["--directory", "d", "--insecure", "maybe"], "x")


def test_an_expired_starved_sample_stops_letting_inserts_past_the_limiter(tmp_path):
    # found by review: the bypass stayed on after the starved sample timed out, and 500
    # inserts went past the limiter
    import time

    server = server_at(tmp_path / "r", selector="mixed", max_times_sampled=3, fresh_fraction=1.0,
                       samples_per_insert=1.0, min_size_to_sample=2, error_buffer=2.0)  # fmt: skip
    server._send = lambda *a, **k: None
    insert(server, "a")
    insert(server, "b")
    assert server.handle("sample", {"batch_size": 2, "version": 0, "req": "s1"})[0] == "batch"
    # nothing fresh left: this sample waits (20 ms) for groups, not for the limiter
    assert server.handle("sample", {"batch_size": 2, "version": 0, "req": "s2",
                                    "timeout_ms": 20}, b"l") is None  # fmt: skip
    server._serve_held()
    time.sleep(0.05)
    server._serve_held()  # it expires: nobody is starved any more
    assert not server.held.samples and not server.starved
    for i in range(50):
        server.handle("insert", {"group": group_to_wire(make_group(f"n{i}")),
                                 "timeout_ms": 10**6}, b"a")  # fmt: skip
        server._serve_held()
    limiter = server.state.limiter
    assert limiter.diff <= limiter.max_diff and len(server.held.inserts) > 40
    server.log.close()


# ---------------------------------------------------------------- retention


def test_retention_deletes_only_segments_nothing_still_reads(tmp_path):
    # before: the log was never deleted; disk use grew with everything ever inserted
    directory = tmp_path / "r"
    settings = dict(segment_bytes=600, selector="fifo", retain="needed")
    server = server_at(directory, **settings)
    insert(server, "keep")  # held throughout: its segment must stay
    for i in range(12):
        insert(server, f"g{i:02d}")
    kinds = server.handle("sample", {"batch_size": 13, "version": 0, "req": "all"})
    assert kinds[0] == "batch" and len(server.buffer) == 0  # every group used up
    insert(server, "keep2")
    for i in range(12, 20):
        insert(server, f"g{i:02d}")
    before = len(server.log.segments())
    server.checkpoint()
    # the sample answer (kept for retries) still reads segment 1, so nothing goes yet
    assert server.retired_segments == 0
    for i in range(8):  # eight more answers push "all" out of the kept ones
        server.handle("sample", {"batch_size": 1, "version": 0, "req": f"s{i}"})
    server.checkpoint()
    assert server.retired_segments == 0  # the first checkpoint still reads segment 1
    server.handle("prune", {"keep": []})  # the learner lets it go: the newest stays
    assert server.retired_segments > 0 and len(server.log.segments()) < before
    live = server.state.snapshot()
    server.log.close()
    again = server_at(directory, **settings)
    assert again.state.snapshot() == live  # from the checkpoint and what is left of the log
    again.log.close()


def test_retain_all_keeps_every_segment(tmp_path):
    server = server_at(tmp_path / "r", segment_bytes=600, selector="fifo")
    for i in range(10):
        insert(server, f"g{i}")
    server.handle("sample", {"batch_size": 10, "version": 0, "req": "all"})
    n = len(server.log.segments())
    server.checkpoint()
    assert len(server.log.segments()) == n and server.retired_segments == 0
    server.log.close()


# ---------------------------------------------------------------- I/O errors, every kind


@pytest.mark.parametrize("fault", ["write", "fsync"])
def test_a_failed_append_of_any_record_kind_leaves_live_and_recovered_states_equal(
    tmp_path, monkeypatch, fault
):
    # a script of every record kind; the k-th append fails once (ENOSPC on its write, or EIO
    # on its fsync with fsync=always), the request gets an error and is retried, and the
    # state a restart recovers equals the live one after every k
    from flowrl_async.replay import log as log_module

    def script(server):
        yield "insert", {"group": group_to_wire(make_group("a", actor_id=1, cursor=0))}
        yield "admit", {"actor": 1, "k": 2}
        yield "insert", {"group": group_to_wire(make_group("b", actor_id=1, cursor=1))}
        yield "version", {"version": 1}
        yield "sample", {"batch_size": 1, "version": 1, "req": "r1"}
        yield "release", {"actor": 1}
        yield "insert", {"group": group_to_wire(make_group("c", version=1))}
        yield "checkpoint", {"tag": "t"}
        yield "sample", {"batch_size": 2, "version": 1, "req": "r2"}

    injected = 0
    for k in range(1, 11):
        directory = tmp_path / f"{fault}-{k}"
        server = server_at(directory, fsync="always", max_staleness=2,
                           selector="uniform", max_times_sampled=2)  # fmt: skip
        name, errno_ = ("write_all", errno.ENOSPC) if fault == "write" else ("fsync", errno.EIO)
        real = getattr(log_module, name)
        monkeypatch.setattr(log_module, name, failing(real, errno_, {k}))
        failures = 0
        for kind, msg in script(server):
            for _attempt in range(2):  # the client's retry
                try:
                    server.handle(kind, dict(msg), b"x")
                    break
                except OSError:
                    failures += 1
        monkeypatch.setattr(log_module, name, real)
        # an append's own failure is undone and the log goes on; a failed fsync of a
        # directory or of a checkpoint's log sync fails the log (nothing more acknowledged)
        assert failures <= 1 or (server.log.failed is not None and fault == "fsync")
        injected += failures > 0
        live = server.state.snapshot()
        server.log.close()
        again = server_at(directory, fsync="always", max_staleness=2, selector="uniform",
                          max_times_sampled=2)  # fmt: skip
        assert again.state.snapshot() == live, f"{fault} fault at append {k}"
        again.log.close()
    assert injected >= 8  # the faults hit every record kind of the script


# ---------------------------------------------------------------- forged frames


def forged_tokens():
    """int32 token ids (all >= 0, so they pass validation) whose bytes are a complete
    frame of the old format holding a ``ver`` record to version 999."""
    import itertools
    import struct
    import zlib

    import msgpack

    # a pad entry (a key of 1-7 letters, a small int) shifts the bytes, a nonce varies the
    # CRC, until no byte >= 0x80 sits in the top byte of an int32
    for pad, nonce, order in itertools.product(range(1, 8), range(128), range(6)):
        items = list(itertools.permutations([("k", "ver"), ("v", 999), ("n", nonce)]))[order]
        payload = msgpack.packb(dict([("p" * pad, 1), *items]))
        frame = struct.pack("<II", len(payload), zlib.crc32(payload)) + payload
        frame += b"\x00" * (-len(frame) % 4)
        ids = np.frombuffer(frame, dtype=np.int32)
        if ids.min() >= 0:
            return np.concatenate([np.arange(5, 9, dtype=np.int32), ids])
    raise AssertionError("no nonce found")


def group_with_tokens(gid, tokens):
    import dataclasses

    g = make_group(gid)
    responses = tuple(dataclasses.replace(r, token_ids=tokens, behavior_logprobs=np.full(
        len(tokens), -1.0, np.float32)) for r in g.responses)  # fmt: skip
    return dataclasses.replace(g, responses=responses)


def test_a_frame_inside_a_groups_bytes_is_never_read_as_a_record(tmp_path):
    # a group whose token bytes hold a complete frame of the old format (a forged `ver`
    # record); its own frame's length field is damaged, so recovery resyncs through it.
    # Old framing: the resync took the first offset whose frame passed its CRC, i.e. the
    # forged record, and the version jumped to 999. Now the resync needs the segment's
    # marker and a MAC under its key, neither of which a client ever sees
    directory = tmp_path / "r"
    server = server_at(directory, max_staleness=1)
    insert(server, "first")
    server.handle("insert", {"group": group_to_wire(group_with_tokens("evil", forged_tokens()))})
    insert(server, "after")
    segment, offset = server.buffer.entries["evil"].where
    server.log.close()
    path = directory / f"seg-{segment:08d}.log"
    data = bytearray(path.read_bytes())
    data[offset + 9] ^= 0x40  # evil's length field
    path.write_bytes(bytes(data))
    again = server_at(directory, max_staleness=1)
    assert again.buffer.version == 0  # no forged record applied
    assert set(again.buffer.entries) == {"first", "after"}
    assert (again.recovery.corrupt_skipped, again.recovery.lost_records) == (1, 1)
    again.log.close()


def test_segments_of_the_old_format_are_still_read_and_never_appended_to(tmp_path):
    import struct
    import zlib

    import msgpack

    from flowrl_async.wire import pack_group

    directory = tmp_path / "r"
    directory.mkdir()
    raw = pack_group(make_group("old"))
    record = b"".join((b"\x83", msgpack.packb("k"), msgpack.packb("ins"), msgpack.packb("g"),
                       raw, msgpack.packb("at"), msgpack.packb(1.5)))  # fmt: skip
    (directory / "seg-00000001.log").write_bytes(
        struct.pack("<II", len(record), zlib.crc32(record)) + record
    )
    server = server_at(directory)
    assert set(server.buffer.entries) == {"old"}
    insert(server, "new")
    assert server.buffer.entries["new"].where[0] == 2  # a new segment of this format
    server.log.close()
    again = server_at(directory)
    assert set(again.buffer.entries) == {"old", "new"}
    again.log.close()


@pytest.mark.parametrize("damage", ["magic bit", "key bit", "first 4 KiB"])
def test_a_damaged_segment_header_never_lets_client_bytes_in(tmp_path, damage):
    # found by review: a segment whose header no longer verified was read as the old
    # format, which took the forged frame in evil's token ids (version 999), and its tail
    # was truncated away. The header is now written twice with a CRC each, a boundary file
    # says which segments are of this format, and one without an intact header is skipped
    # and kept, never read as the old format
    directory = tmp_path / "r"
    server = server_at(directory, max_staleness=1)
    for i in range(12):
        insert(server, f"g{i}")
    server.handle("insert", {"group": group_to_wire(group_with_tokens("evil", forged_tokens()))})
    insert(server, "after")
    server.log.close()
    (path,) = sorted(directory.glob("seg-*.log"))
    data = bytearray(path.read_bytes())
    if damage == "magic bit":
        data[3] ^= 0x01
    elif damage == "key bit":
        data[12] ^= 0x10
    else:
        data[:4096] = bytes(4096)
    path.write_bytes(bytes(data))
    again = server_at(directory, max_staleness=1)
    assert again.buffer.version == 0  # no forged record, whatever the damage
    if damage == "first 4 KiB":  # both header copies gone: the segment is set aside
        assert again.recovery.damaged_segments == 1 and len(again.buffer) == 0
        assert path.read_bytes() == bytes(data)  # kept as it is, nothing truncated
        insert(again, "new")
        assert again.buffer.entries["new"].where[0] == 2  # never appended to
    else:  # the other copy holds: every record is read
        assert set(again.buffer.entries) == {*(f"g{i}" for i in range(12)), "evil", "after"}
    again.log.close()


def test_every_record_recovered_after_damage_is_one_the_server_wrote_at_its_place(tmp_path):
    # every bit of one record's frame head flipped in turn, then random 4 KiB pages zeroed:
    # whatever recovery yields is a record the server wrote, at the place it wrote it, and
    # with one head damaged only that record is lost
    import random
    import shutil

    from flowrl_async.replay.log import HEAD, SegmentLog

    directory = tmp_path / "r"
    server = server_at(directory, segment_bytes=1 << 20)
    for i in range(40):
        group = group_with_tokens(f"e{i}", forged_tokens()) if i % 3 == 0 else make_group(f"g{i}")
        server.handle("insert", {"group": group_to_wire(group)})
    server.log.close()
    (path,) = sorted(directory.glob("seg-*.log"))
    written = list(SegmentLog(directory).read_from(truncate=False))
    truth = dict(written)
    assert len(written) == 40
    original = path.read_bytes()
    victim = written[20][0][1]
    trial = tmp_path / "t"

    def recovered(data: bytes):
        shutil.rmtree(trial, ignore_errors=True)
        trial.mkdir()
        shutil.copy(directory / "FORMAT", trial / "FORMAT")
        (trial / path.name).write_bytes(data)
        return list(SegmentLog(trial).read_from(truncate=False))

    for bit in range(HEAD.size * 8):
        data = bytearray(original)
        data[victim + bit // 8] ^= 1 << (bit % 8)
        got = recovered(bytes(data))
        assert all(truth.get(pos) == payload for pos, payload in got), f"head bit {bit}"
        assert len(got) >= 39, f"head bit {bit}: {len(got)} records"
    rng = random.Random(5)
    for _ in range(20):
        data = bytearray(original)
        for _page in range(3):
            at = rng.randrange(0, len(data), 4096)
            data[at : at + 4096] = bytes(len(data[at : at + 4096]))
        got = recovered(bytes(data))
        assert all(truth.get(pos) == payload for pos, payload in got)
