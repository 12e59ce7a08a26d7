"""The msgpack codec: exact round trips and clear rejections."""

import msgpack
import numpy as np
import pytest

from flowrl_async.wire import (
    SCHEMA_VERSION,
    WireError,
    WireLimits,
    decode,
    encode,
    group_from_wire,
    group_to_wire,
)

from factories import make_group


def roundtrip(group, limits=WireLimits()):
    kind, msg = decode(encode("insert", group=group_to_wire(group)), limits)
    assert kind == "insert"
    return group_from_wire(msg["group"], limits)


def test_group_round_trip_is_exact():
    g = make_group(n=3, tokens=4, version=5, rewards=[1.0, 0.0, -0.25])
    back = roundtrip(g)
    assert back.group_id == g.group_id and back.prompt_id == 7 and back.task == "digits"
    assert back.sampling == g.sampling and (back.created_at, back.finished_at) == (100.0, 101.5)
    for a, b in zip(back.responses, g.responses, strict=True):
        assert np.array_equal(a.token_ids, b.token_ids) and a.token_ids.dtype == np.int32
        assert np.array_equal(a.behavior_logprobs, b.behavior_logprobs)
        assert (a.reward, a.finish_reason, a.first_version, a.info) == (
            b.reward,
            b.finish_reason,
            b.first_version,
            b.info,
        )
    assert back.min_version == 5


def mutate(field_path, value):
    obj = group_to_wire(make_group())
    target = obj
    for key in field_path[:-1]:
        target = target[key]
    target[field_path[-1]] = value
    return obj


@pytest.mark.parametrize(
    "path, value, reason",
    [
        (
            ("responses", 0, "lp"),
            {"dt": "float32", "sh": [3], "b": np.float32([0.5, -1, -1]).tobytes()},
            "finite and <= 0",
        ),
        (
            ("responses", 0, "lp"),
            {"dt": "float32", "sh": [3], "b": np.float32([np.nan, -1, -1]).tobytes()},
            "finite and <= 0",
        ),
        (
            ("responses", 0, "lp"),
            {"dt": "float32", "sh": [2], "b": np.float32([-1, -1]).tobytes()},
            "3 token ids but 2",
        ),
        (
            ("responses", 0, "tok"),
            {"dt": "int32", "sh": [3], "b": b"\x00" * 11},
            "do not match shape",
        ),
        (
            ("responses", 0, "tok"),
            {"dt": "complex64", "sh": [1], "b": b"\x00" * 8},
            "unknown dtype",
        ),
        (("responses", 0, "r"), float("inf"), "not finite"),
        (("responses", 0, "fin"), "exploded", "unknown finish reason"),
        (("responses", 0, "ver"), [3, 2], "versions must satisfy"),
        (("responses",), [], "no responses"),
        (("id",), 17, "field 'id' has type int"),
        (("pid",), True, "field 'pid' has type bool"),
    ],
)
def test_malformed_groups_are_rejected_with_a_reason(path, value, reason):
    with pytest.raises(WireError, match=reason):
        group_from_wire(mutate(path, value))


def test_limits_are_enforced():
    g = make_group(n=5, tokens=10)
    with pytest.raises(WireError, match="5 responses exceed 4"):
        roundtrip(g, WireLimits(max_responses=4))
    with pytest.raises(WireError, match="10 elements exceed the limit of 8"):
        roundtrip(g, WireLimits(max_tokens=8))
    with pytest.raises(WireError, match="exceeds 100"):
        decode(encode("insert", group=group_to_wire(g)), WireLimits(max_message_bytes=100))


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\xc1", "not a valid msgpack"),
        (msgpack.packb([1, 2]), "must be a map"),
        (msgpack.packb({"v": SCHEMA_VERSION + 1, "t": "x"}), "schema version"),
        (msgpack.packb({"v": SCHEMA_VERSION}), "no type"),
        (msgpack.packb({"v": True, "t": "x"}), "schema version"),  # True == 1 in Python
        (msgpack.packb({"v": 1.0, "t": "x"}), "schema version"),
        (msgpack.packb({1: 2}), "not a valid msgpack"),  # non-string keys
    ],
)
def test_bad_envelopes(data, reason):
    with pytest.raises(WireError, match=reason):
        decode(data)
