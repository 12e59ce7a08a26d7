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


def window(d: Dedup) -> tuple:
    w = d.producers[P]
    return w.high, w.floor, w.gaps


def test_a_producers_ids_are_held_as_a_window_with_gap_ranges():
    d = Dedup(window=3)
    for seq in (0, 1, 2, 5):
        d.add(f"{P}-{seq}")
    # 3 and 4 never came (one gap range); below 5 - 3 = 2 nothing is known any more
    assert window(d) == (5, 2, [[3, 5]])
    assert statuses(d, range(7)) == [EXPIRED, EXPIRED, SEEN, NEW, NEW, SEEN, NEW]
    d.add(f"{P}-4")  # a gap filled late: the range shrinks
    assert window(d) == (5, 2, [[3, 4]]) and statuses(d, [3, 4]) == [NEW, SEEN]
    d.add(f"{P}-10")  # the window moves to 7: the old gap is forgotten, 6..9 open
    assert window(d) == (10, 7, [[7, 10]])
    assert statuses(d, [3, 6, 7, 9, 10, 11]) == [EXPIRED, EXPIRED, NEW, NEW, SEEN, NEW]
    d.add(f"{P}-8")  # a gap in the middle of a range splits it
    assert window(d) == (10, 7, [[7, 8], [9, 10]]) and len(d) == 1 + 2


def test_a_jump_ahead_costs_one_range_not_one_entry_per_seq():
    # before: a new producer at seq 1023 stored 1023 gap numbers (~60 kB an insert)
    d = Dedup()
    for i in range(100):
        d.add(f"{i:032x}-1023")
    assert len(d) == 200  # 100 producers, one gap range each
    assert d.status(f"{0:032x}-5") == NEW and d.status(f"{0:032x}-1023") == SEEN


def test_an_id_held_back_by_a_higher_one_of_the_same_message_expires():
    d = Dedup(window=3)
    d.add(f"{P}-0")
    assert d.status(f"{P}-2") == NEW
    # the message also accepts seq 9 before it: once applied, 9 - 3 = 6 is the floor
    assert d.status(f"{P}-2", pending={P: 9}) == EXPIRED
    assert d.status(f"{P}-7", pending={P: 9}) == NEW
    assert Dedup(window=3).status(f"{P}-2", pending={P: 9}) == EXPIRED  # a new producer too


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
    assert again == d and window(again) == (3, 0, [[1, 3]])
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


def test_a_message_never_acknowledges_a_group_its_own_higher_seq_pushes_out(tmp_path, monkeypatch):
    # before: [P-2000, P-3] in one message were both acknowledged, and P-3 was then dropped
    # as a duplicate when applied (the first one moved the window past it)
    server = server_at(tmp_path / "r")
    _, reply = server.handle("insert_batch", {"groups": [pack_group(make_group(f"{P}-{s}"))
                                                         for s in (2000, 3, 1500)]})  # fmt: skip
    assert [r[0] for r in reply["results"]] == ["accepted", REJECTED, "accepted"]
    assert sorted(server.buffer.entries) == [f"{P}-1500", f"{P}-2000"]
    assert server.buffer.counters.duplicates == 0
    server.log.close()


def test_a_held_insert_that_expired_while_waiting_gets_an_error(tmp_path):
    # before: it got an ack (duplicate false) and was never stored
    server = server_at(tmp_path / "r", samples_per_insert=1.0, min_size_to_sample=1,
                       error_buffer=1.0)  # fmt: skip
    sent = []
    server._send = lambda identity, kind, rid, **fields: sent.append((rid, kind, fields))
    for i, seq in enumerate((0, 1, 2000, 3)):  # the limiter holds all but the first few
        server.handle("insert", {"group": group_to_wire(make_group(f"{P}-{seq}")), "rid": i,
                                 "timeout_ms": 10**6}, b"a")  # fmt: skip
    held = list(server.held.inserts)
    assert held[-2:] == [f"{P}-2000", f"{P}-3"]
    for _ in range(4):  # samples free the limiter: the held ones go in order
        server.handle("sample", {"batch_size": 1, "version": 0, "req": f"s{_}", "timeout_ms": 0},
                      b"l")  # fmt: skip
        server._serve_held()
    outcome = {fields.get("group_id", rid): kind for rid, kind, fields in sent if kind != "batch"}
    assert outcome.get(f"{P}-2000") == "ack"
    errors = [f for _, kind, f in sent if kind == "error"]
    assert any("too old to tell from a retry" in f["reason"] for f in errors)
    assert f"{P}-3" not in server.buffer.entries and not server.held.inserts
    server.log.close()


def test_recovery_rebuilds_the_same_windows_from_the_log_and_from_a_checkpoint(tmp_path):
    server = server_at(tmp_path / "r")
    for seq in (0, 1, 5, 3, 2000, 1990):  # gaps, a late one, a jump
        server.handle("insert", {"group": group_to_wire(make_group(f"{P}-{seq}"))})
    server.handle("insert", {"group": group_to_wire(make_group("legacy-id"))})
    live = server.buffer.seen.snapshot()
    assert live["producers"] == [[P, 2000, 976, [[976, 1990], [1991, 2000]]]]
    server.log.close()
    replayed = server_at(tmp_path / "r")
    assert replayed.buffer.seen.snapshot() == live
    replayed.checkpoint()
    replayed.log.close()
    restored = server_at(tmp_path / "r")
    assert restored.stats()["recovered_records"] == 0 and restored.buffer.seen.snapshot() == live
    restored.log.close()
