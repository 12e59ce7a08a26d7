"""Faults a SIGKILL does not model (a lost log tail, failed writes, power loss) and peers
that lie: each test here failed before its fix."""

import errno

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
