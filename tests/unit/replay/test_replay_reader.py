"""Reading a stored run's replay log: summary per version, JSONL export, damage skipped."""

import dataclasses
import json
from datetime import datetime

import msgpack
import pytest

from flowrl_async.cli import main
from flowrl_async.replay.log import SegmentLog
from flowrl_async.replay.reader import GroupFilter, stored_groups, summary
from flowrl_async.replay.server import ReplayServer, ServerConfig
from flowrl_async.replay.service import ReplayService
from flowrl_async.replay.state import insert_record
from flowrl_async.wire import group_to_wire, pack_group

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
    data[120] ^= 0xFF  # inside the first record's payload: its check no longer matches
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


def written_run(directory):
    """Four groups written straight into a log with known insert times, versions, tasks:
    (id, version, task, at) = a 0 digits 100, b 1 digits 200, c 1 math 300, d 3 digits 400."""
    log = SegmentLog(directory)
    for gid, version, task, at in [
        ("a", 0, "digits", 100.0),
        ("b", 1, "digits", 200.0),
        ("c", 1, "math", 300.0),
        ("d", 3, "digits", 400.0),
    ]:
        group = dataclasses.replace(make_group(gid, version=version), task=task)
        log.append_many([insert_record(pack_group(group), at)])
    log.close()


@pytest.mark.parametrize(
    "where, kept",
    [
        (GroupFilter(), "abcd"),
        (GroupFilter(min_version=1), "bcd"),
        (GroupFilter(max_version=1), "abc"),
        (GroupFilter(min_version=1, max_version=1), "bc"),
        (GroupFilter(since=200.0), "bcd"),  # bounds inclusive
        (GroupFilter(until=300.0), "abc"),
        (GroupFilter(since=150.0, until=350.0), "bc"),
        (GroupFilter(task="math"), "c"),
        (GroupFilter(min_version=1, task="digits", until=399.0), "b"),
        (GroupFilter(min_version=4), ""),
    ],
)
def test_a_filter_keeps_the_groups_it_names(tmp_path, where, kept):
    written_run(tmp_path)
    got = [(g.group_id, at) for g, at, _ in stored_groups(tmp_path, where)]
    assert "".join(gid for gid, _ in got) == kept
    times = {"a": 100.0, "b": 200.0, "c": 300.0, "d": 400.0}
    assert all(at == times[gid] for gid, at in got)


def test_filters_from_the_command_line(tmp_path, capsys):
    written_run(tmp_path / "replay")
    out = tmp_path / "g.jsonl"
    main(["replay", str(tmp_path), "--versions", "1:", "--task", "digits", "--export", str(out)])
    assert [json.loads(x)["group_id"] for x in out.read_text().splitlines()] == ["b", "d"]
    main(["replay", str(tmp_path), "--versions", "3", "--export", str(out)])
    assert [json.loads(x)["group_id"] for x in out.read_text().splitlines()] == ["d"]
    iso = datetime.fromtimestamp(250.0).isoformat()  # local time, as the CLI reads it
    main(["replay", str(tmp_path), "--since", iso, "--until", "400", "--export", str(out)])
    assert [json.loads(x)["group_id"] for x in out.read_text().splitlines()] == ["c", "d"]
    capsys.readouterr()
    for bad, says in [
        (["--versions", "3:1"], "empty version range 3..1"),
        (["--versions", "x"], "not a version range"),
        (["--since", "yesterday"], "not a time"),
        (["--since", "300", "--until", "200"], "empty time range"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(["replay", str(tmp_path), *bad])
        assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_into_feeds_a_running_service_once(tmp_path, capsys):
    written_run(tmp_path / "stored" / "replay")
    service = ReplayService(ServerConfig(str(tmp_path / "fresh"), "tcp://127.0.0.1:0"))
    try:
        args = ["replay", str(tmp_path / "stored"), "--versions", ":1", "--into", service.address()]
        main(args)
        assert "inserted 3 groups into" in capsys.readouterr().out
        main(args)  # again: the same ids, nothing twice
        assert "(0 new)" in capsys.readouterr().out
        stats = service.stats()
        assert (stats["inserted"], stats["duplicates"], stats["size"]) == (3, 3, 3)
    finally:
        service.stop()
    fresh = [g.group_id for g, _, _ in stored_groups(tmp_path / "fresh")]
    assert fresh == ["a", "b", "c"]


def test_preload_filters_are_checked_with_the_configuration():
    from flowrl_async.config import TrainConfig, validate

    cfg = TrainConfig()
    cfg.replay.preload_task = "math"
    with pytest.raises(ValueError, match="filters need replay.preload"):
        validate(cfg)
    cfg.replay.preload_task, cfg.replay.preload_since = None, "not a time"
    with pytest.raises(ValueError, match="replay.preload_.*not a time"):
        validate(cfg)
    cfg.replay.preload_since = "1970-01-01T00:10:00+00:00"
    assert cfg.replay.preload_filter() == GroupFilter(since=600.0)
