"""Reading a stored run's replay log: summary per version, JSONL export, damage skipped."""

import json

import msgpack

from flowrl_async.cli import main
from flowrl_async.replay.reader import stored_groups, summary
from flowrl_async.replay.server import ReplayServer, ServerConfig
from flowrl_async.wire import group_to_wire

from factories import make_group


def stored_run(directory):
    server = ReplayServer(ServerConfig(str(directory), "tcp://127.0.0.1:0", max_staleness=None))
    # version 0: two groups, rewards (1, 0) and (1, 1); version 2: one group, rewards (0, 0)
    for gid, version, rewards in [("a", 0, [1.0, 0.0]), ("b", 0, [1.0, 1.0]), ("c", 2, [0.0, 0.0])]:
        server.handle(
            "insert", {"group": group_to_wire(make_group(gid, version=version, rewards=rewards))}
        )
    server.handle("sample", {"batch_size": 1, "version": 2, "req": "r1", "timeout_ms": 0})
    server.log.close()


def test_summary_and_export(tmp_path, capsys):
    stored_run(tmp_path / "run" / "replay")
    # factories mark every response info "ok": accuracy is 1 wherever there are responses
    assert summary(tmp_path / "run" / "replay") == [
        {"version": 0, "groups": 2, "trained": 1, "reward": 0.75, "accuracy": 1.0},
        {"version": 2, "groups": 1, "trained": 0, "reward": 0.0, "accuracy": 1.0},
    ]
    out = tmp_path / "groups.jsonl"
    main(["replay", str(tmp_path / "run"), "--export", str(out)])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["group_id"] for g in lines] == ["a", "b", "c"]
    assert [g["times_trained"] for g in lines] == [1, 0, 0]
    assert lines[0]["responses"][1]["behavior_logprobs"] == [-1.5, -1.5, -1.5]
    assert "exported 3 groups" in capsys.readouterr().out


def test_a_corrupt_record_is_skipped_and_the_log_left_alone(tmp_path):
    directory = tmp_path / "replay"
    stored_run(directory)
    segment = sorted(directory.glob("seg-*.log"))[0]
    data = bytearray(segment.read_bytes())
    data[20] ^= 0xFF  # inside the first record's payload: its CRC no longer matches
    segment.write_bytes(bytes(data))
    assert [g.group_id for g, _, _ in stored_groups(directory)] == ["b", "c"]
    assert segment.read_bytes() == bytes(data)  # the reader never writes


def test_samples_a_rewind_undid_do_not_count_as_trained(tmp_path):
    """a sampled before the replay checkpoint; b and c after it, by a learner step that was
    lost (the learner resumed from that checkpoint: rewind); b again after the rewind."""
    directory = tmp_path / "replay"
    server = ReplayServer(ServerConfig(str(directory), "tcp://127.0.0.1:0", max_staleness=None))
    for gid in "abcd":
        server.handle("insert", {"group": group_to_wire(make_group(gid))})

    def sample(n, req):
        kind, reply = server.handle(
            "sample", {"batch_size": n, "version": 0, "req": req, "timeout_ms": 0}
        )
        return [msgpack.unpackb(g)["id"] for g in reply["groups"]]

    assert sample(1, "r1") == ["a"]
    checkpoint = server.checkpoint()["path"]
    assert sample(2, "r2") == ["b", "c"]  # trained by the lost update
    server.rewind(checkpoint)
    assert sample(1, "r3") == ["b"]  # offered again after the rewind
    server.log.close()
    trained = {g.group_id: times for g, _, times in stored_groups(directory)}
    assert trained == {"a": 1, "b": 1, "c": 0, "d": 0}
    # a second rewind to the same checkpoint undoes r3 too; the one before it stays undone
    server = ReplayServer(ServerConfig(str(directory), "tcp://127.0.0.1:0", max_staleness=None))
    server.rewind(checkpoint)
    server.log.close()
    trained = {g.group_id: times for g, _, times in stored_groups(directory)}
    assert trained == {"a": 1, "b": 0, "c": 0, "d": 0}
