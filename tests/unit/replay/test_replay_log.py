"""The segment log's batched appends and its background fsync (fsync="interval")."""

import threading
import time

import pytest

from flowrl_async.replay.log import HEAD, SegmentLog


def contents(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("seg-*.log"))}


@pytest.mark.parametrize("fsync", ["always", "interval", "never"])
def test_append_many_writes_what_appending_one_by_one_writes(tmp_path, fsync):
    records = [bytes([i % 251]) * (5 + 7 * i) for i in range(40)]
    one = SegmentLog(tmp_path / "one", segment_bytes=300, fsync=fsync)
    for r in records:
        one.append(r)
    one.close()
    many = SegmentLog(tmp_path / "many", segment_bytes=300, fsync=fsync)
    for start in (0, 3, 17):  # batches that cross segment boundaries
        end = {0: 3, 3: 17, 17: 40}[start]
        # some records in parts: their payload is the concatenation
        many.append_many([(r[:2], r[2:]) if i % 3 else r for i, r in enumerate(records[start:end])])
    many.close()
    assert len(contents(tmp_path / "one")) > 3  # rotation happened
    # the same frames at the same places (each segment's key and marker are its own)
    sizes = {d: {k: len(v) for k, v in contents(tmp_path / d).items()} for d in ("one", "many")}
    assert sizes["one"] == sizes["many"]
    read = {d: list(SegmentLog(tmp_path / d).read_from()) for d in ("one", "many")}
    assert read["one"] == read["many"]
    assert list(SegmentLog(tmp_path / "many").read_all()) == records


def test_empty_records_are_refused_before_anything_is_written(tmp_path):
    log = SegmentLog(tmp_path)
    with pytest.raises(ValueError, match="1.."):
        log.append_many([b"ok", (b"", b"")])
    log.close()
    assert list(SegmentLog(tmp_path).read_all()) == []


def test_interval_fsyncs_happen_off_the_appending_thread_within_the_interval(tmp_path):
    log = SegmentLog(tmp_path, fsync="interval", fsync_interval_ms=20)
    log.append(b"x")
    assert log._syncer is not None and log._syncer.is_alive()
    deadline = time.monotonic() + 2
    while log.dirty and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not log.dirty  # the background thread synced it
    log.close()
    assert log._syncer is None


def test_close_while_the_syncer_waits_out_its_interval_does_not_hang(tmp_path):
    for i in range(3):
        log = SegmentLog(tmp_path / str(i), fsync="interval", fsync_interval_ms=50)
        log.append(b"x")  # wakes the syncer, which then sleeps until the interval is over
        time.sleep(0.01)
        closer = threading.Thread(target=log.close, daemon=True)
        closer.start()  # close's wake-up lands while the syncer sleeps
        closer.join(5)
        assert not closer.is_alive(), "SegmentLog.close hung"
        assert not log.dirty


def test_appends_return_the_positions_reads_give_and_read_at_fetches_those_frames(tmp_path):
    records = [bytes([65 + i % 26]) * (5 + 7 * i) for i in range(30)]
    log = SegmentLog(tmp_path, segment_bytes=300, fsync="never")
    positions = [log.append(records[0])]
    positions += log.append_many(records[1:12])  # crosses segment boundaries
    positions += log.append_many([(r[:2], r[2:]) for r in records[12:]])
    assert positions == [pos for pos, _ in log.read_from(truncate=False)]  # while writing
    log.close()
    # the 80-byte segment header (two copies), then 28-byte frame heads: + 5, + 12 bytes
    assert positions[:3] == [(1, 80), (1, 113), (1, 153)]
    assert len({seg for seg, _ in positions}) > 3
    assert log.read_at(positions[::-1]) == dict(zip(positions, records, strict=True))
    # damage: a flipped payload byte, a missing segment, an offset inside a frame: left out
    seg, off = positions[5]
    path = tmp_path / f"seg-{seg:08d}.log"
    data = bytearray(path.read_bytes())
    data[off + HEAD.size + 1] ^= 0xFF  # a payload byte: only the check can tell
    path.write_bytes(bytes(data))
    asked = [positions[4], positions[5], (99, 0), (positions[6][0], positions[6][1] + 3)]
    assert log.read_at(asked) == {positions[4]: records[4]}
