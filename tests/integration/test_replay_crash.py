"""The replay server as a real process: killed with SIGKILL mid-stream, then a damaged log."""

import threading

import msgpack
import pytest

from flowrl_async.replay.client import ReplayClient
from flowrl_async.replay.log import HEAD, SegmentLog

from factories import make_group
from helpers import ServerProcess

pytestmark = pytest.mark.integration

N = 150  # groups in the stream
KILL_AFTER = 40  # acknowledged groups before the SIGKILL


def frames(directory) -> list[tuple[int, bytes]]:
    """(offset of the payload, payload) of each frame of the log's one segment."""
    log = SegmentLog(directory)
    return [(pos + HEAD.size, payload) for (_, pos), payload in log.read_from(truncate=False)]


def all_ids(client, n) -> list[str]:
    batch = client.sample(n, version=0, timeout_s=0.5)
    assert batch is not None, client.stats()
    return sorted(g.group_id for g, _ in batch)


@pytest.mark.parametrize("window", [1, 8])
def test_sigkill_mid_stream_then_damaged_log(tmp_path, window):
    directory = tmp_path / "replay"
    ids = [f"g{i:03d}" for i in range(N)]
    server = ServerProcess(directory)
    address = server.address

    acked, enough = [], threading.Event()

    def stream():  # one client, retrying through the crash until acknowledged
        client = ReplayClient(address, request_timeout_s=0.3, max_retries=100)
        for start in range(0, N, 10):
            chunk = ids[start : start + 10]
            groups = [make_group(gid, n=4, tokens=32) for gid in chunk]
            if window == 1:
                for g in groups:
                    client.insert(g)  # one at a time
            else:
                client.insert_many(groups, window=window)  # up to `window` in flight
            acked.extend(chunk)
            if len(acked) >= KILL_AFTER:
                enough.set()
        client.close()

    writer = threading.Thread(target=stream)
    writer.start()
    assert enough.wait(30)
    acked_before_kill = len(acked)
    server.kill()  # the writer is mid-stream: its next insert times out and is retried
    server = ServerProcess(directory, address)
    assert server.stats["recovered_records"] >= acked_before_kill  # every ack survived
    writer.join(60)
    assert not writer.is_alive() and acked == ids

    stats = server.client.stats()
    # every group exactly once: one accepted insert each, all held (nothing is used up)
    assert (stats["inserted"], stats["size"]) == (N, N)
    assert stats["duplicates"] <= window  # at most the inserts in flight at the kill
    assert all_ids(server.client, N) == ids
    server.stop()

    # damage the log: one flipped payload byte in a middle record, then a torn frame
    (segment,) = sorted(directory.glob("seg-*.log"))
    data = bytearray(segment.read_bytes())
    inserts = [
        (offset, payload)
        for offset, payload in frames(directory)
        if msgpack.unpackb(payload)["k"] == "ins"
    ]
    assert len(inserts) == N
    offset, payload = inserts[N // 2]
    victim = msgpack.unpackb(payload)["g"]["id"]
    data[offset + len(payload) // 2] ^= 0xFF
    marker = bytes(data[24:32])  # the segment's own (its header's first copy)
    torn = HEAD.pack(marker, 1000, 10**6, bytes(8)) + b"x" * 10  # claims 1000, has 10: 38
    segment.write_bytes(bytes(data) + torn)

    server = ServerProcess(directory, address)
    try:
        stats = server.stats
        assert (stats["recovery_corrupt_skipped"], stats["recovery_torn_bytes"]) == (1, 38)
        assert segment.stat().st_size == len(data)  # the torn tail was cut off
        # N inserts + 1 sample record were written; the damaged insert is gone
        assert stats["recovered_records"] == N + 1 - 1
        assert stats["size"] == N - 1
        assert all_ids(server.client, N - 1) == [i for i in ids if i != victim]
        # the lost group is unknown again, so an actor's resend would be accepted
        assert server.client.insert(make_group(victim, n=4, tokens=32)) is True
    finally:
        server.stop()


def test_cli_flags_turn_the_rate_limiter_on(tmp_path):
    flags = ["--samples-per-insert", "0.5", "--min-size-to-sample", "2", "--error-buffer", "3"]
    server = ServerProcess(tmp_path / "replay", "tcp://127.0.0.1:0", *flags)
    try:
        # min_diff = 2·0.5 − 3 = −2, max_diff = 2·0.5 + 3 = 4
        assert (server.stats["limiter_min_diff"], server.stats["limiter_max_diff"]) == (-2, 4)
    finally:
        server.stop()
