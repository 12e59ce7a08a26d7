"""Exactly-once inserts in bounded memory (replay/dedup.py): watermarks per producer."""

import pytest

from flowrl_async.records import GroupIds
from flowrl_async.replay.dedup import EXPIRED, NEW, SEEN, Dedup
from flowrl_async.replay.server import ReplayServer, ServerConfig
from flowrl_async.wire import REJECTED, WireError, group_to_wire, pack_group

from factories import make_group

P = "ab" * 16  # a producer: 32 hex digits


def statuses(d: Dedup, seqs) -> list[str]:
    return [d.status(f"{P}-{s}") for s in seqs]


def test_a_producers_ids_are_held_as_a_watermark_and_its_gaps():
    d = Dedup(max_gaps=3)
    for seq in (0, 1, 2, 5):
        d.add(f"{P}-{seq}")
    # 3 and 4 never came (gaps); below 5 - 3 = 2 nothing is known any more
    assert d.producers == {P: [5, 2, {3, 4}]}
    assert statuses(d, range(7)) == [EXPIRED, EXPIRED, SEEN, NEW, NEW, SEEN, NEW]
    d.add(f"{P}-4")  # a gap filled late
    assert statuses(d, [3, 4]) == [NEW, SEEN]
    d.add(f"{P}-10")  # five new gaps (6..9 and 3): only the 3 newest kept
    assert d.producers == {P: [10, 7, {7, 8, 9}]}
    assert statuses(d, [3, 6, 7, 10, 11]) == [EXPIRED, EXPIRED, NEW, SEEN, NEW]
    assert len(d) == 1 + 3  # one producer, three gaps


def test_gaps_beyond_the_bound_forget_the_lowest_first():
    d = Dedup(max_gaps=2)
    d.add(f"{P}-0")
    d.add(f"{P}-2")  # gap 1
    d.add(f"{P}-4")  # gaps 1, 3; floor 2 forgets 1
    assert d.producers == {P: [4, 2, {3}]}
    assert statuses(d, [1, 2, 3]) == [EXPIRED, SEEN, NEW]


def test_other_ids_are_kept_as_they_are():
    d = Dedup()
    for gid in ("g1", "A" * 32 + "-1", f"{P}-01", f"{P}-1x"):  # not a producer id
        assert d.status(gid) == NEW
        d.add(gid)
        assert d.status(gid) == SEEN
    assert d.legacy == {"g1", "A" * 32 + "-1", f"{P}-01", f"{P}-1x"} and not d.producers


def test_memory_stays_bounded_by_producers_not_groups():
    d, ids = Dedup(), [GroupIds() for _ in range(4)]
    for _ in range(25_000):
        for maker in ids:
            d.add(maker.next())
    assert len(d) == 4  # before: a set of all 100,000 ids
    assert all(d.status(f"{m.producer}-24999") == SEEN for m in ids)
    assert all(d.status(m.next()) == NEW for m in ids)


def test_snapshot_round_trip_and_a_checkpoint_that_kept_every_id():
    d = Dedup()
    for gid in (f"{P}-0", f"{P}-3", "g1"):
        d.add(gid)
    again = Dedup.restore(d.snapshot())
    assert again == d and again.producers[P] == [3, 0, {1, 2}]
    older = Dedup.restore(None, seen=[f"{P}-0", f"{P}-3", "g1"])  # a checkpoint's "seen"
    assert older == d


def server_at(directory, **settings) -> ReplayServer:
    return ReplayServer(ServerConfig(str(directory), max_staleness=None, **settings))


def test_the_service_acknowledges_a_retry_as_a_duplicate_after_a_restart(tmp_path):
    ids = GroupIds()
    first, second = ids.next(), ids.next()
    server = server_at(tmp_path / "r")
    for gid in (first, second):
        assert server.handle("insert", {"group": group_to_wire(make_group(gid))})[1] == {
            "group_id": gid, "duplicate": False,
        }  # fmt: skip
    server.log.close()
    again = server_at(tmp_path / "r")  # the watermark is rebuilt from the log
    assert again.handle("insert", {"group": group_to_wire(make_group(first))})[1] == {
        "group_id": first, "duplicate": True,
    }  # fmt: skip
    assert again.stats()["dedup_entries"] == 1 and again.stats()["dedup_producers"] == 1
    again.checkpoint()
    again.log.close()
    third = server_at(tmp_path / "r")  # from the checkpoint this time
    assert third.stats()["recovered_records"] == 0
    assert third.handle("insert", {"group": group_to_wire(make_group(second))})[1]["duplicate"]
    third.log.close()


def test_a_group_too_old_to_tell_from_a_retry_is_refused_not_acknowledged(tmp_path, monkeypatch):
    monkeypatch.setattr("flowrl_async.replay.dedup.MAX_GAPS", 2)
    monkeypatch.setattr(Dedup.__init__, "__defaults__", (2,))
    server = server_at(tmp_path / "r")
    server.handle("insert", {"group": group_to_wire(make_group(f"{P}-9"))})  # 0..6 forgotten
    with pytest.raises(WireError, match="too old to tell from a retry"):
        server.handle("insert", {"group": group_to_wire(make_group(f"{P}-3"))})
    batch = [pack_group(make_group(f"{P}-{s}")) for s in (3, 8)]
    _, reply = server.handle("insert_batch", {"groups": batch})
    assert reply["results"][0][0] == REJECTED and "too old" in reply["results"][0][1]
    assert reply["results"][1] == ["accepted", ""]  # a gap still known
    assert server.stats()["dedup_expired"] == 2 and len(server.buffer) == 2
    server.log.close()
