"""The msgpack wire codec for the data plane. Never pickle.

A message is a msgpack map ``{"v": SCHEMA_VERSION, "t": type, ...fields}``. Numpy arrays
travel as ``{"dt": dtype, "sh": shape, "b": raw bytes}`` and decode zero-copy
(``np.frombuffer`` over the received bytes, read-only). The decoder enforces size limits
while unpacking (msgpack refuses over-long containers before building them) and validates
every group strictly. Anything malformed raises ``WireError`` with a message that says what
was wrong; no other exception type escapes ``decode``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from flowrl_async.records import Group, RecordError, Response, SamplingParams

SCHEMA_VERSION = 1
DTYPES = {"int32": np.int32, "float32": np.float32, "int64": np.int64, "float64": np.float64}


class WireError(ValueError):
    """A message that cannot be decoded or breaks the schema."""


@dataclass(frozen=True)
class WireLimits:
    max_message_bytes: int = 64 * 1024 * 1024
    max_responses: int = 1024
    max_tokens: int = 131_072  # per array (prompt or response)
    max_groups: int = 4096  # per message


def pack_array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    name = a.dtype.name
    if name not in DTYPES:
        raise WireError(f"cannot send dtype {name}")
    return {"dt": name, "sh": list(a.shape), "b": a.data.cast("B") if a.size else b""}


def unpack_array(obj: Any, what: str, limits: WireLimits) -> np.ndarray:
    if not isinstance(obj, dict) or set(obj) != {"dt", "sh", "b"}:
        raise WireError(f"{what}: expected an array map with keys dt, sh, b")
    dtype = DTYPES.get(obj["dt"]) if isinstance(obj["dt"], str) else None
    if dtype is None:
        raise WireError(f"{what}: unknown dtype {obj['dt']!r}")
    shape = obj["sh"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise WireError(f"{what}: bad shape {shape!r}")
    size = math.prod(shape)
    if size > limits.max_tokens:
        raise WireError(f"{what}: {size} elements exceed the limit of {limits.max_tokens}")
    raw = obj["b"]
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise WireError(f"{what}: array bytes must be binary")
    if memoryview(raw).nbytes != size * np.dtype(dtype).itemsize:
        raise WireError(f"{what}: {len(raw)} bytes do not match shape {shape} of {obj['dt']}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def group_to_wire(g: Group) -> dict:
    s = g.sampling
    return {
        "id": g.group_id,
        "pid": g.prompt_id,
        "prompt": pack_array(np.asarray(g.prompt_token_ids, dtype=np.int32)),
        "task": g.task,
        "actor": g.actor_id,
        "cursor": g.cursor,
        "sampling": [s.temperature, s.top_p, s.max_tokens, s.n],
        "times": [g.created_at, g.finished_at],
        "responses": [
            {
                "tok": pack_array(np.asarray(r.token_ids, dtype=np.int32)),
                "lp": pack_array(np.asarray(r.behavior_logprobs, dtype=np.float32)),
                "r": float(r.reward),
                "fin": r.finish_reason,
                "ver": [r.first_version, r.last_version],
                "info": r.info,
            }
            for r in g.responses
        ],
    }


def _get(obj: dict, key: str, types, what: str):
    if key not in obj:
        raise WireError(f"{what}: missing field {key!r}")
    value = obj[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise WireError(f"{what}: field {key!r} has type bool")
    if not isinstance(value, types):
        raise WireError(f"{what}: field {key!r} has type {type(value).__name__}")
    return value


def _numbers(value: Any, n: int, what: str) -> list:
    if not isinstance(value, list) or len(value) != n:
        raise WireError(f"{what}: expected a list of {n} numbers")
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in value):
        raise WireError(f"{what}: expected numbers, got {value!r}")
    return value


def group_from_wire(obj: Any, limits: WireLimits = WireLimits()) -> Group:
    if not isinstance(obj, dict):
        raise WireError("group: expected a map")
    what = f"group {obj.get('id')!r}"
    raw_responses = _get(obj, "responses", list, what)
    if len(raw_responses) > limits.max_responses:
        raise WireError(f"{what}: {len(raw_responses)} responses exceed {limits.max_responses}")
    temperature, top_p, max_tokens, n = _numbers(obj.get("sampling"), 4, f"{what} sampling")
    created, finished = _numbers(obj.get("times"), 2, f"{what} times")
    responses = []
    for i, r in enumerate(raw_responses):
        where = f"{what} response {i}"
        if not isinstance(r, dict):
            raise WireError(f"{where}: expected a map")
        first, last = _numbers(r.get("ver"), 2, f"{where} versions")
        if not (isinstance(first, int) and isinstance(last, int)):
            raise WireError(f"{where}: versions must be integers")
        responses.append(
            Response(
                token_ids=unpack_array(_get(r, "tok", dict, where), f"{where} token ids", limits),
                behavior_logprobs=unpack_array(
                    _get(r, "lp", dict, where), f"{where} log-probs", limits
                ),
                reward=float(_get(r, "r", int | float, where)),
                finish_reason=_get(r, "fin", str, where),
                first_version=first,
                last_version=last,
                info=_get(r, "info", str, where),
            )
        )
    group = Group(
        group_id=_get(obj, "id", str, what),
        prompt_id=_get(obj, "pid", int, what),
        prompt_token_ids=unpack_array(_get(obj, "prompt", dict, what), f"{what} prompt", limits),
        task=_get(obj, "task", str, what),
        responses=tuple(responses),
        actor_id=_get(obj, "actor", int, what),
        cursor=_get(obj, "cursor", int, what),
        sampling=SamplingParams(float(temperature), float(top_p), int(max_tokens), int(n)),
        created_at=float(created),
        finished_at=float(finished),
    )
    for r in group.responses:
        if r.token_ids.dtype != np.int32 or r.behavior_logprobs.dtype != np.float32:
            raise WireError(f"{what}: token ids must be int32 and log-probs float32")
    try:
        group.validate()
    except RecordError as e:
        raise WireError(str(e)) from None
    return group


def encode(msg_type: str, **fields: Any) -> bytes:
    """One message: the schema version, its type and its fields."""
    return msgpack.packb({"v": SCHEMA_VERSION, "t": msg_type, **fields}, use_bin_type=True)


def decode(data: bytes, limits: WireLimits = WireLimits()) -> tuple[str, dict]:
    """-> (type, fields). Raises WireError for anything malformed, and nothing else."""
    if len(data) > limits.max_message_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds {limits.max_message_bytes}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=limits.max_message_bytes,
            max_str_len=1 << 20,
            max_array_len=max(limits.max_groups, limits.max_responses, 64),
            max_map_len=64,
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises many types for bad input; report them as one
        raise WireError(f"not a valid msgpack message: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise WireError("message must be a map")
    if type(obj.get("v")) is not int or obj["v"] != SCHEMA_VERSION:  # True == 1 in Python
        raise WireError(f"schema version {obj.get('v')!r} is not {SCHEMA_VERSION}")
    msg_type = obj.get("t")
    if not isinstance(msg_type, str):
        raise WireError("message has no type")
    return msg_type, obj
