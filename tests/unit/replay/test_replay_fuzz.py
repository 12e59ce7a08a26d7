"""10,500 malformed or random messages against a live replay server: one reply each, every
rejection counted, nothing crashes, and a valid insert still works afterwards."""

import random

import msgpack
import numpy as np
import pytest

from flowrl_async.replay.client import ReplayClient
from flowrl_async.replay.server import ReplayServer, ServerConfig
from flowrl_async.wire import (
    ACCEPTED,
    DUPLICATE,
    REJECTED,
    WireError,
    WireLimits,
    _group_from_wire_checked,
    _unpack,
    decode,
    encode,
    group_from_wire,
    group_to_wire,
    pack_group,
)

from factories import make_group
from helpers import serve_and_connect

pytestmark = pytest.mark.integration

# small limits, so that "too big" costs 64 KiB per message instead of 64 MiB
LIMITS = WireLimits(max_message_bytes=1 << 16, max_responses=16, max_tokens=512, max_groups=64)


def base_groups() -> list[dict]:
    return [
        group_to_wire(make_group(f"base{i}", n=1 + i % 4, tokens=1 + i % 7, version=i % 3))
        for i in range(16)
    ]


def insert_accepted(data: bytes) -> bool:
    """What the server does with a mutated insert frame: accept it (ack) or reject it."""
    try:
        kind, msg = decode(data, LIMITS)
        if kind != "insert":
            return False  # one flipped byte cannot turn "insert" into another known type
        group_from_wire(msg.get("group"), LIMITS)
        timeout = msg.get("timeout_ms", 0)
        return isinstance(timeout, int) and not isinstance(timeout, bool)
    except WireError:
        return False


WRONG_INTS = ["1", 1.5, None, [], {}, True, b"\x01", -1e300]


def bad_group(rng: random.Random, groups: list[dict]) -> object:
    """A group that must be rejected: not a map, or one field of the wrong type or value."""
    if rng.random() < 0.2:
        return rng.choice([None, 5, "g", [], {}, {"id": 3}, b"raw"])
    g = msgpack.unpackb(msgpack.packb(rng.choice(groups)), raw=False)  # a deep copy
    r = g["responses"][0]
    field, value = rng.choice(
        [
            ("pid", "7"),
            ("actor", True),
            ("cursor", 1.5),
            ("task", 5),
            ("id", ""),
            ("responses", {}),
            ("sampling", [1.0, 1.0, 8]),
            ("times", [1.0, "a"]),
            ("prompt", {"dt": "int8", "sh": [3], "b": b"abc"}),
            ("prompt", {"dt": "int32", "sh": [1 << 30], "b": b""}),  # huge declared shape
            ("prompt", {"dt": "int32", "sh": [-1], "b": b""}),
            ("prompt", {"dt": "int32", "sh": [4], "b": b"\x00" * 12}),  # 12 bytes, 4 ints
            ("r", "1.0"),
            ("r", float("nan")),
            ("fin", "eos"),
            ("ver", [2, 1]),
            ("lp", {"dt": "float32", "sh": [1], "b": np.float32([0.5]).tobytes()}),
            ("tok", {"dt": "float32", "sh": [0], "b": b""}),
        ]
    )
    if field in ("r", "fin", "ver", "lp", "tok"):
        r[field] = value
        if field in ("lp", "tok"):  # keep lengths equal so the dtype/sign is what fails
            r["lp" if field == "tok" else "tok"] = {
                "dt": "int32" if field == "lp" else "float32",
                "sh": [value["sh"][0]],
                "b": b"\x00" * 4 * value["sh"][0],
            }
    else:
        g[field] = value
    return g


def bad_map(rng: random.Random, groups: list[dict], rid: int) -> bytes:
    """A well-formed msgpack map whose request must be rejected."""
    kind = rng.choice(["insert", "admit", "release", "sample", "checkpoint", "unknown", ""])
    fields: dict = {"rid": rid}
    if kind == "insert":
        fields["group"] = bad_group(rng, groups)
    elif kind == "admit":
        fields["actor"], fields["k"] = rng.choice(
            [(rng.choice(WRONG_INTS), 1), (1, rng.choice(WRONG_INTS))]
        )
    elif kind == "release":
        if rng.random() < 0.5:
            fields["actor"] = rng.choice(WRONG_INTS)
    elif kind == "sample":
        fields.update(batch_size=1, version=0, timeout_ms=0, req="r")
        key, value = rng.choice(
            [("batch_size", 0), ("batch_size", "2"), ("version", None), ("req", 3), ("req", "")]
            + [("timeout_ms", 0.5)]
        )
        fields[key] = value
    elif kind == "checkpoint":
        fields["tag"] = rng.choice([3, "../escape", "a b", "x" * 65, None])
    return msgpack.packb({"v": 1, "t": kind, **fields}, use_bin_type=True)


HUGE = [  # msgpack headers that declare far more than follows
    b"\xdf\xff\xff\xff\xff",  # map32 of 4 billion entries
    b"\xdd\xff\xff\xff\xff",  # array32
    b"\xc6\x7f\xff\xff\xff\x00",  # bin32 of 2 GiB
    b"\xdb\x7f\xff\xff\xff\x61",  # str32
]


def fuzz_messages(seed: int = 1234) -> list[tuple[str, list[bytes], bool]]:
    """(category, frames, rejected?) for each message, in sending order."""
    rng = random.Random(seed)
    groups = base_groups()
    valid = [encode("insert", rid=i, group=g) for i, g in enumerate(groups)]
    out = []
    for _ in range(4000):  # 1-3 flipped bytes in a valid insert: accepted or rejected
        data = bytearray(rng.choice(valid))
        for _flip in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
        out.append(("flip", [bytes(data)], not insert_accepted(bytes(data))))
    for _ in range(2000):  # a strict prefix of a valid insert is never a whole message
        data = rng.choice(valid)
        out.append(("truncated", [data[: rng.randrange(len(data))]], True))
    for i in range(2000):
        out.append(("bad map", [bad_map(rng, groups, i)], True))
    for i in range(500):
        v = rng.choice([0, 3, 99, -1, "1", None, b"\x01", [1]])
        data = msgpack.packb({"v": v, "t": "insert", "rid": i, "group": rng.choice(groups)})
        out.append(("schema version", [data], True))
    for i in range(500):
        if i % 5 == 0:  # bigger than the 64 KiB limit
            data = msgpack.packb({"v": 1, "t": "stats", "pad": b"\x00" * (1 << 16)})
        else:  # a map of 4 entries: 3 valid ones, then "group" declaring a huge value
            head = msgpack.packb({"v": 1, "t": "insert", "rid": i})  # 0x83: a map of 3
            data = b"\x84" + head[1:] + b"\xa5group" + rng.choice(HUGE)
        out.append(("huge", [data], True))
    for _ in range(500):  # extra frames after a valid message
        frames = [rng.choice(valid)] + [b"x"] * rng.randint(1, 3)
        out.append(("extra frames", frames, True))
    for _ in range(1000):  # not a map at all, or an extension type
        data = rng.choice(
            [
                msgpack.packb(rng.randint(-(1 << 40), 1 << 40)),
                msgpack.packb([1, "insert", {}]),
                msgpack.packb("insert"),
                msgpack.packb(msgpack.ExtType(5, b"abc")),
                bytes(rng.randrange(256) for _byte in range(rng.randint(0, 40))),
            ]
        )
        out.append(("not a map", [data], not _decodes(data)))
    return out


def _decodes(data: bytes) -> bool:
    try:
        decode(data, LIMITS)
        return True  # random bytes that happen to be a valid message: counted as is
    except WireError:
        return False


def test_fuzzed_messages_are_each_answered_and_counted(tmp_path):
    messages = fuzz_messages()
    assert len(messages) == 10_500
    expected_rejected = sum(rejected for _, _, rejected in messages)
    # versions as the reference decoder takes them (no jump bound: flipped bytes make any)
    server = ReplayServer(ServerConfig(str(tmp_path / "replay"), "tcp://127.0.0.1:0",
                                       max_version_jump=1 << 53), LIMITS)  # fmt: skip
    thread, sock = serve_and_connect(server)
    try:
        mismatches = []
        for index, (category, frames, rejected) in enumerate(messages):
            sock.send_multipart(frames)
            assert sock.poll(5000), f"no reply to message {index} ({category})"
            reply = sock.recv_multipart()
            assert len(reply) == 1, f"message {index}: {len(reply)} reply frames"
            kind, _ = decode(reply[0])
            if (kind == "error") != rejected:
                mismatches.append((index, category, kind))
        assert mismatches == []
        assert thread.is_alive()
        client = ReplayClient(server.bound_address, request_timeout_s=2.0, max_retries=1)
        stats = client.stats()
        assert (stats["rejected"], stats["internal_errors"]) == (expected_rejected, 0)
        assert sum(stats["rejected_by"].values()) == expected_rejected  # each has a reason
        assert client.insert(make_group("after-the-storm")) is True
        assert client.stats()["rejected"] == expected_rejected
        client.close()
    finally:
        sock.close(0)
        server.stop()
        thread.join(5)


def reference_verdict(data: bytes) -> str | None:
    """The group id when the reference (field by field) decoder accepts these bytes."""
    try:
        return _group_from_wire_checked(_unpack(data, LIMITS), LIMITS).group_id
    except Exception:  # anything _unpack raises, or WireError
        return None


def test_fuzzed_groups_in_batches_get_the_reference_decoders_verdicts(tmp_path):
    """3,000 mutated group encodings in insert_batch messages of 10: each gets rejected
    exactly when the reference decoder rejects it (so the server's fast check never accepts
    what the full check refuses), duplicates are told apart, and nothing crashes."""
    rng = random.Random(99)
    valid = [pack_group(make_group(f"fz{i}", n=1 + i % 4, tokens=1 + i % 7)) for i in range(40)]
    items = []
    for _ in range(3000):
        data = bytearray(rng.choice(valid))
        if rng.random() < 0.1:
            data = data[: rng.randrange(len(data))]
        else:
            for _flip in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
        items.append(bytes(data))
    server = ReplayServer(
        ServerConfig(
            str(tmp_path / "replay"),
            "tcp://127.0.0.1:0",
            max_staleness=None,
            max_version_jump=1 << 53,
        ),
        LIMITS,
    )
    thread, sock = serve_and_connect(server)
    try:
        seen, expected, got = set(), [], []
        for start in range(0, len(items), 10):
            batch = items[start : start + 10]
            for data in batch:
                gid = reference_verdict(data)
                if gid is None:
                    expected.append(REJECTED)
                else:
                    expected.append(DUPLICATE if gid in seen else ACCEPTED)
                    seen.add(gid)
            sock.send(encode("insert_batch", rid=start, groups=batch))
            assert sock.poll(5000), f"no reply to the batch at {start}"
            kind, msg = decode(sock.recv())
            assert (kind, msg["rid"]) == ("acks", start)
            got += [status for status, _ in msg["results"]]
        assert got == expected
        assert 300 < len(expected) - expected.count(REJECTED) < 2700  # both verdicts
        client = ReplayClient(server.bound_address, request_timeout_s=2.0, max_retries=1)
        stats = client.stats()
        assert (stats["rejected"], stats["internal_errors"]) == (expected.count(REJECTED), 0)
        assert stats["inserted"] == expected.count(ACCEPTED) == len(seen)
        client.close()
    finally:
        sock.close(0)
        server.stop()
        thread.join(5)
