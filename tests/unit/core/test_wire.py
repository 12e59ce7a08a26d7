"""The msgpack codec: exact round trips and clear rejections."""

import dataclasses

import msgpack
import numpy as np
import pytest

from flowrl_async.records import Response
from flowrl_async.wire import (
    SCHEMA_VERSION,
    GroupInfo,
    Packed,
    WireError,
    WireLimits,
    _check_fast,
    _group_from_wire_checked,
    check_group,
    decode,
    encode,
    group_from_wire,
    group_from_wire_trusted,
    group_to_wire,
    pack_array,
    pack_group,
    unpack_group,
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


# ------------------------------------------------------------------ fast paths and bytes
def assert_same_group(a, b):
    """Field by field (dataclass == would compare numpy arrays elementwise)."""
    assert (a.group_id, a.prompt_id, a.task, a.actor_id, a.cursor) == (
        b.group_id,
        b.prompt_id,
        b.task,
        b.actor_id,
        b.cursor,
    )
    assert (a.sampling, a.created_at, a.finished_at) == (b.sampling, b.created_at, b.finished_at)
    assert a.prompt_token_ids.dtype == b.prompt_token_ids.dtype
    assert np.array_equal(a.prompt_token_ids, b.prompt_token_ids)
    assert len(a.responses) == len(b.responses)
    for x, y in zip(a.responses, b.responses, strict=True):
        assert x.token_ids.dtype == y.token_ids.dtype == np.int32
        assert x.behavior_logprobs.dtype == y.behavior_logprobs.dtype == np.float32
        assert np.array_equal(x.token_ids, y.token_ids)
        assert np.array_equal(x.behavior_logprobs, y.behavior_logprobs)
        assert (x.reward, x.finish_reason, x.first_version, x.last_version, x.info) == (
            y.reward,
            y.finish_reason,
            y.first_version,
            y.last_version,
            y.info,
        )
        assert x.switches == y.switches and type(x.switches) is tuple


GROUPS = [
    make_group("a"),
    make_group("b", n=5, tokens=0, version=3, rewards=[0.0, 1.0, -2.5, 0.0, 7.0]),
    make_group("c", n=1, tokens=300, actor_id=4, cursor=12, prompt_id=-3),
]


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.group_id)
def test_trusted_decode_gives_the_same_group_as_the_validating_decode(group):
    obj = msgpack.unpackb(pack_group(group), raw=False)  # as a server reply carries it
    trusted = group_from_wire_trusted(obj)
    assert_same_group(trusted, group_from_wire(obj))
    assert_same_group(trusted, _group_from_wire_checked(obj, WireLimits()))  # the reference
    assert_same_group(group_from_wire(obj), group)
    for made, built in zip(trusted.responses, group.responses, strict=True):
        # built without __init__: the same class, fields in the same order, still frozen
        assert type(made) is Response and list(vars(made)) == list(vars(built))
        with pytest.raises(dataclasses.FrozenInstanceError):
            made.reward = 0.0
    # a prompt of another dtype is refused (the learner embeds int32 ids), and a map the
    # fast check leaves to the full one
    obj["prompt"] = pack_array(np.arange(4, dtype=np.int64))
    with pytest.raises(WireError, match="prompt token ids must be int32"):
        group_from_wire(obj)
    obj["prompt"] = pack_array(np.arange(4, dtype=np.int32))
    obj["responses"][0]["tok"] = pack_array(group.responses[0].token_ids.reshape(1, -1)[0])
    obj["responses"][0]["tok"]["b"] = memoryview(obj["responses"][0]["tok"]["b"])
    assert_same_group(group_from_wire_trusted(obj), group_from_wire(obj))


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.group_id)
def test_packed_group_bytes_validate_once_and_give_the_server_what_it_needs(group):
    obj, info = unpack_group(pack_group(group))
    rewards = [r.reward for r in group.responses]
    assert info == GroupInfo(
        group.group_id, group.actor_id, group.cursor, group.min_version,
        max(rewards) - min(rewards),
    )  # fmt: skip
    assert check_group(obj) == info


@pytest.mark.parametrize(
    "data, reason",
    [
        ({"id": "x"}, "expected msgpack bytes"),
        (b"\xc1", "not valid msgpack"),
        (pack_group(make_group()) + b"\x00", "not valid msgpack"),  # trailing data
        (msgpack.packb([1]), "expected a map"),
        (msgpack.packb({"id": "x"}), "missing field 'responses'"),
    ],
)
def test_unpack_group_rejects_bad_bytes(data, reason):
    with pytest.raises(WireError, match=reason):
        unpack_group(data)


def test_every_group_the_fast_check_accepts_the_full_check_accepts_alike():
    """Mutated groups (one field of every response or of the group set to an odd value):
    the fast check may leave a group to the full check, never accept one it rejects, and
    the verdict and the info are the same either way."""
    base = group_to_wire(make_group(n=3, tokens=4))
    odd = [None, True, 0, 1, -1, 2.5, float("nan"), float("inf"), "", "stop", "x", b"b",
           [], [1], [0, 0], [1, 0], [0, 1, 2], {}, {"dt": "int32", "sh": [4], "b": b"\0" * 16}]  # fmt: skip
    cases = []
    for key in list(base):
        for value in odd:
            cases.append({**base, key: value})
    for key in [*base["responses"][0], "vsw"]:
        for value in [*odd, [2, 1], [1, 1, 2, 2]]:
            g = msgpack.unpackb(msgpack.packb(base), raw=False)
            g["responses"][1][key] = value
            if key == "vsw" and value in ([2, 1], [1, 1, 2, 2]):  # valid once last agrees
                g["responses"][1]["ver"] = [0, value[-1]]
            cases.append(g)
    accepted = 0
    for obj in cases:
        obj = msgpack.unpackb(msgpack.packb(obj), raw=False)  # plain types, as off the wire
        fast = _check_fast(obj, WireLimits())
        try:
            full = _group_from_wire_checked(obj, WireLimits())
        except WireError:
            assert fast is None, obj
            with pytest.raises(WireError):
                check_group(obj)
            continue
        accepted += 1
        if fast is not None:
            rewards = [r.reward for r in full.responses]
            assert fast == (full.group_id, full.actor_id, full.cursor, full.min_version,
                            max(rewards) - min(rewards))  # fmt: skip
            assert_same_group(group_from_wire(obj), full)
    assert 20 < accepted < len(cases) - 100  # both verdicts well represented


def test_vectorised_validation_reports_the_first_fault_in_response_order():
    obj = group_to_wire(make_group(n=3, tokens=2))
    obj["responses"][2]["lp"] = pack_array(np.float32([0.5, -1]))  # response 2: positive
    obj["responses"][1]["fin"] = "exploded"  # response 1: found first, as before
    with pytest.raises(WireError, match="response 1: unknown finish reason"):
        group_from_wire(obj)
    obj["responses"][1]["fin"] = "stop"
    with pytest.raises(WireError, match="response 2: behavior log-probs must be finite"):
        group_from_wire(obj)


@pytest.mark.parametrize(
    "path, value, reason",
    [
        (("responses", 0, "tok"), {"dt": "int32", "sh": [], "b": b"\0" * 4}, "must be 1-D"),
        (("responses", 0, "lp"), {"dt": "float32", "sh": [3, 1], "b": b"\0" * 12}, "1-D"),
        (("prompt",), {"dt": "int32", "sh": [], "b": b"\0" * 4}, "must be 1-D"),
        (("sampling",), [1.0, 1.0, float("inf"), 8], "must be finite"),
    ],
)
def test_odd_shapes_and_values_are_wire_errors_not_crashes(path, value, reason):
    with pytest.raises(WireError, match=reason):
        group_from_wire(mutate(path, value))


def test_packed_fields_are_spliced_in_as_they_are():
    groups = [pack_group(g) for g in GROUPS]
    spliced = encode("batch", rid=3, groups=Packed(groups), info=[[1, 0, 2.5]])
    kind, msg = decode(spliced)
    assert kind == "batch" and msg["rid"] == 3 and msg["info"] == [[1, 0, 2.5]]
    plain = [msgpack.unpackb(b, raw=False) for b in groups]
    assert msg["groups"] == plain
    assert spliced == encode("batch", rid=3, groups=plain, info=[[1, 0, 2.5]])


def switched(group, *switches):
    """``group`` with response i's version switches set to switches[i] (last_version too)."""
    responses = []
    for r, sw in zip(group.responses, switches, strict=False):
        last = sw[-1] if sw else r.first_version
        responses.append(dataclasses.replace(r, switches=tuple(sw), last_version=last))
    return dataclasses.replace(group, responses=(*responses, *group.responses[len(switches) :]))


def test_per_token_versions_round_trip_and_read_back_per_token():
    # response 0: tokens 0-1 at version 3, 2-4 at 5, 5 at 6; response 1: 0-3 at 3, 4-5 at 4
    g = switched(make_group(n=3, tokens=6, version=3), (2, 5, 5, 6), (4, 4))
    obj = msgpack.unpackb(pack_group(g), raw=False)
    assert obj["responses"][0]["vsw"] == [2, 5, 5, 6] and "vsw" not in obj["responses"][2]
    for back in (roundtrip(g), group_from_wire_trusted(obj)):
        assert_same_group(back, g)
        assert back.responses[0].token_versions().tolist() == [3, 3, 5, 5, 5, 6]
        assert back.responses[1].token_versions().tolist() == [3, 3, 3, 3, 4, 4]
        assert back.responses[2].token_versions().tolist() == [3] * 6
        assert back.min_version == 3
    assert _check_fast(obj, WireLimits()) is not None  # switches take the fast path
    # a group of one version is byte for byte what schema 1 wrote
    plain = make_group(n=2, tokens=3, version=1)
    assert "vsw" not in msgpack.unpackb(pack_group(plain), raw=False)["responses"][0]


def test_schema_1_messages_and_records_still_read():
    old = msgpack.packb({"v": 1, "t": "insert", "group": group_to_wire(make_group())})
    kind, msg = decode(old)
    assert kind == "insert" and group_from_wire(msg["group"]).responses[0].switches == ()
    # streaming records of schema 1: versions spanning a load, the split not recorded
    r = dataclasses.replace(make_group(tokens=4).responses[0], first_version=2, last_version=5)
    assert r.token_versions().tolist() == [2, 2, 2, 2]  # the oldest: staleness never understated


@pytest.mark.parametrize(
    "switches, reason",
    [
        ([-1, 4], "positions must rise strictly within"),
        ([6, 4], "positions must rise strictly within"),  # past the last token
        ([3, 4, 3, 5], "positions must rise strictly within"),
        ([2, 3], "versions must rise strictly from above first"),  # not above first (3)
        ([2, 5, 4, 4], "versions must rise strictly"),
        ([2, 4, 3], "pairs of integers"),
        ([2, True], "pairs of integers"),
        ([2, 4.0], "pairs of integers"),
        ([], "non-empty list"),
        ("x", "non-empty list"),
    ],
)
def test_bad_switches_are_rejected_with_a_reason(switches, reason):
    obj = group_to_wire(make_group(n=2, tokens=6, version=3))
    obj["responses"][0]["vsw"] = switches
    obj["responses"][0]["ver"] = [3, 4]
    obj = msgpack.unpackb(msgpack.packb(obj), raw=False)
    assert _check_fast(obj, WireLimits()) is None
    with pytest.raises(WireError, match=reason):
        group_from_wire(obj)


def test_switches_whose_last_version_is_not_last_are_rejected():
    obj = group_to_wire(switched(make_group(n=2, tokens=6, version=3), (2, 5)))
    obj["responses"][0]["ver"] = [3, 6]  # the last switch says 5
    with pytest.raises(WireError, match=r"to last \(6\)"):
        group_from_wire(msgpack.unpackb(msgpack.packb(obj), raw=False))


def test_a_switch_at_0_and_versions_past_int64():
    # a switch at 0: every token from version 4, the prompt's keys and values maybe older
    g = switched(make_group(n=1, tokens=3, version=3), (0, 4))
    assert roundtrip(g).responses[0].token_versions().tolist() == [4, 4, 4]
    for ver in ([0, 2**63], [2**63, 2**64 - 1]):  # token_versions would overflow int64
        obj = group_to_wire(make_group())
        obj["responses"][0]["ver"] = ver
        obj = msgpack.unpackb(msgpack.packb(obj), raw=False)
        assert _check_fast(obj, WireLimits()) is None
        with pytest.raises(WireError, match="< 2\\^63"):
            group_from_wire(obj)
