"""The msgpack wire codec for the data plane. Never pickle.

A message is a msgpack map ``{"v": SCHEMA_VERSION, "t": type, ...fields}``. Numpy arrays
travel as ``{"dt": dtype, "sh": shape, "b": raw bytes}`` and decode zero-copy
(``np.frombuffer`` over the received bytes, read-only). The decoder enforces size limits
while unpacking (msgpack refuses over-long containers before building them) and validates
every group strictly. Anything malformed raises ``WireError`` with a message that says what
was wrong; no other exception type escapes ``decode``.

Groups travel two ways: as a nested map (``group_to_wire``) or as the msgpack bytes of that
map (``pack_group``; the ``insert_batch`` message). The replay server validates a group once,
on insert (``unpack_group`` / ``group_from_wire``), keeps the validated bytes and sends them
back spliced into its replies as they are (``Packed``); the client decodes those replies with
``group_from_wire_trusted``, which skips the checks the server already made. Never use the
trusted decoder on anything but a replay server's reply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
import numpy as np

from flowrl_async.records import (
    FINISH_REASONS,
    VERSION_LIMIT,
    Group,
    RecordError,
    Response,
    SamplingParams,
    switches_problem,
)

SCHEMA_VERSION = 2  # 2: a response may carry "vsw", its per-token version switches
READABLE_SCHEMAS = (1, 2)  # a version-1 message is a version-2 one without switches
DTYPES = {"int32": np.int32, "float32": np.float32, "int64": np.int64, "float64": np.float64}


# the outcome of each group of an ``insert_batch`` (the ``acks`` reply lists one per group)
ACCEPTED, DUPLICATE, REJECTED, TIMEOUT = "accepted", "duplicate", "rejected", "timeout"


class WireError(ValueError):
    """A message that cannot be decoded or breaks the schema."""


@dataclass(frozen=True)
class WireLimits:
    """The sizes a decoder accepts; anything larger is rejected as malformed."""

    max_message_bytes: int = 64 * 1024 * 1024
    max_responses: int = 1024
    max_tokens: int = 131_072  # per array (prompt or response)
    max_groups: int = 4096  # per message
    vocab_size: int | None = None  # token ids must be below it (None: only >= 0)


_DTYPE_OF = {name: np.dtype(t) for name, t in DTYPES.items()}
_NAME_OF = {dtype: name for name, dtype in _DTYPE_OF.items()}  # dtype.name is slow
_MAX, _MIN = np.maximum.reduce, np.minimum.reduce  # without ndarray.max's Python wrapper


def pack_array(a: np.ndarray) -> dict:
    if type(a) is not np.ndarray or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    name = _NAME_OF.get(a.dtype)
    if name is None:
        raise WireError(f"cannot send dtype {a.dtype.name}")
    return {"dt": name, "sh": list(a.shape), "b": a.tobytes()}


MAX_DIMS = 8


def _clip(text: str, limit: int = 80) -> str:
    """A value quoted in an error, cut short (errors must not echo a peer's megabytes)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unpack_array(obj: Any, what: str, limits: WireLimits) -> np.ndarray:
    if not isinstance(obj, dict) or set(obj) != {"dt", "sh", "b"}:
        raise WireError(f"{what}: expected an array map with keys dt, sh, b")
    dtype = DTYPES.get(obj["dt"]) if isinstance(obj["dt"], str) else None
    if dtype is None:
        raise WireError(f"{what}: unknown dtype {_clip(repr(obj['dt']))}")
    shape = obj["sh"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise WireError(f"{what}: bad shape {_clip(repr(shape))}")
    size = math.prod(shape)
    if size > limits.max_tokens:
        raise WireError(f"{what}: {size} elements exceed the limit of {limits.max_tokens}")
    if max(shape, default=0) > limits.max_tokens:  # [0, 2**64 − 1]: no elements, no shape
        raise WireError(f"{what}: bad shape {_clip(repr(shape))}")
    raw = obj["b"]
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise WireError(f"{what}: array bytes must be binary")
    if memoryview(raw).nbytes != size * np.dtype(dtype).itemsize:
        raise WireError(f"{what}: {len(raw)} bytes do not match shape {shape} of {obj['dt']}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _response_to_wire(r: Response) -> dict:
    out = {
        "tok": pack_array(np.asarray(r.token_ids, dtype=np.int32)),
        "lp": pack_array(np.asarray(r.behavior_logprobs, dtype=np.float32)),
        "r": float(r.reward),
        "fin": r.finish_reason,
        "ver": [r.first_version, r.last_version],
        "info": r.info,
    }
    if r.switches:  # only then: a group of one version is byte for byte a version-1 group
        out["vsw"] = list(r.switches)
    return out


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
        "responses": [_response_to_wire(r) for r in g.responses],
    }


def pack_group(g: Group) -> bytes:
    """The msgpack bytes of ``group_to_wire(g)``: how ``insert_batch`` carries a group."""
    return msgpack.packb(group_to_wire(g), use_bin_type=True)


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
        raise WireError(f"{what}: expected numbers, got {_clip(repr(value))}")
    return value


class GroupInfo(NamedTuple):
    """What the replay server needs of a validated group besides its bytes."""

    group_id: str
    actor_id: int
    cursor: int
    min_version: int  # the oldest weight version that generated any of its tokens
    reward_spread: float  # max − min reward within the group (the prioritised selector's)


def check_group(obj: Any, limits: WireLimits = WireLimits()) -> GroupInfo:
    """Validate a group's wire map exactly as ``group_from_wire`` does (same verdicts, same
    messages) without building the Group; -> what the replay server keeps of it."""
    info = _check_fast(obj, limits)
    if info is not None:
        return info
    g = _group_from_wire_checked(obj, limits)  # raises with the reason (or accepts, rarely)
    rewards = [r.reward for r in g.responses]
    return GroupInfo(g.group_id, g.actor_id, g.cursor, g.min_version, max(rewards) - min(rewards))


def group_from_wire(obj: Any, limits: WireLimits = WireLimits()) -> Group:
    """The validating decoder: a Group, or WireError saying what is wrong. For anything that
    comes from outside (the replay server runs ``check_group`` on every insert)."""
    if _check_fast(obj, limits) is not None:
        return group_from_wire_trusted(obj)
    return _group_from_wire_checked(obj, limits)


def _size_1d(a: Any, dtype: str | None, limits: WireLimits) -> int | None:
    """n when ``a`` is an array map of a 1-D array of n <= max_tokens elements of ``dtype``
    (None: any known dtype) whose bytes match; None for anything else."""
    if type(a) is not dict or len(a) != 3:
        return None
    dt, shape, raw = a.get("dt"), a.get("sh"), a.get("b")
    if dtype is not None and dt != dtype:
        return None
    known = _DTYPE_OF.get(dt) if type(dt) is str else None
    if known is None or type(shape) is not list or len(shape) != 1 or type(raw) is not bytes:
        return None
    n = shape[0]
    if type(n) is not int or not 0 <= n <= limits.max_tokens or len(raw) != n * known.itemsize:
        return None
    return n


def _number(x: Any) -> bool:
    return type(x) is float or type(x) is int


def _check_fast(obj: Any, limits: WireLimits) -> GroupInfo | None:
    """Every check of ``_group_from_wire_checked`` for the common shape of a valid group (maps
    straight off msgpack: plain types, 1-D arrays, bytes), with all log-probs checked in one
    numpy call; -> its info, or None, in which case ``_group_from_wire_checked`` decides and
    explains. Sound by construction: it accepts only what that one accepts."""
    if type(obj) is not dict:
        return None
    gid, responses = obj.get("id"), obj.get("responses")
    actor, cursor = obj.get("actor"), obj.get("cursor")
    if type(gid) is not str or not gid or type(responses) is not list or not responses:
        return None
    if len(responses) > limits.max_responses:
        return None
    s, t = obj.get("sampling"), obj.get("times")
    if type(s) is not list or len(s) != 4 or type(s[2]) is not int or type(s[3]) is not int:
        return None
    if not (_number(s[0]) and _number(s[1]) and type(t) is list and len(t) == 2):
        return None
    if not (_number(t[0]) and _number(t[1]) and type(obj.get("pid")) is int):
        return None
    if type(obj.get("task")) is not str or type(actor) is not int or type(cursor) is not int:
        return None
    prompt = obj.get("prompt")
    if _size_1d(prompt, "int32", limits) is None:
        return None
    logprobs, rewards, firsts, max_tokens = [], [], [], limits.max_tokens
    tokens = [prompt["b"]]
    for r in responses:
        if type(r) is not dict:
            return None
        ver, reward, fin = r.get("ver"), r.get("r"), r.get("fin")
        if type(ver) is not list or len(ver) != 2:
            return None
        first, last = ver
        if (
            type(first) is not int
            or type(last) is not int
            or not 0 <= first <= last < VERSION_LIMIT
        ):
            return None
        if type(reward) is float:
            if not math.isfinite(reward):
                return None
        elif type(reward) is not int:
            return None
        if type(fin) is not str or fin not in FINISH_REASONS or type(r.get("info")) is not str:
            return None
        # token ids and log-probs: 1-D int32 and float32 of the same length n (inlined
        # ``_size_1d``: this loop is the server's hot path)
        tok, lp = r.get("tok"), r.get("lp")
        if type(tok) is not dict or type(lp) is not dict or len(tok) != 3 or len(lp) != 3:
            return None
        if tok.get("dt") != "int32" or lp.get("dt") != "float32":
            return None
        tok_shape, lp_shape, tok_raw, lp_raw = (
            tok.get("sh"),
            lp.get("sh"),
            tok.get("b"),
            lp.get("b"),
        )
        if type(tok_shape) is not list or type(lp_shape) is not list:
            return None
        if len(tok_shape) != 1 or len(lp_shape) != 1:
            return None
        n, m = tok_shape[0], lp_shape[0]
        if type(n) is not int or type(m) is not int or m != n or not 0 <= n <= max_tokens:
            return None
        if type(tok_raw) is not bytes or type(lp_raw) is not bytes:
            return None
        if len(tok_raw) != 4 * n or len(lp_raw) != 4 * n:
            return None
        if len(r) != 6 and not (len(r) == 7 and _switches_ok(r.get("vsw"), n, first, last)):
            return None
        logprobs.append(lp_raw)
        tokens.append(tok_raw)
        rewards.append(reward)
        firsts.append(first)
    lp = np.frombuffer(b"".join(logprobs), dtype=np.float32)
    # finite and <= 0, all at once: the max is <= 0 (false with a NaN or +inf) and the min is
    # above -inf
    if lp.size and not (_MAX(lp) <= 0 and _MIN(lp) > -math.inf):
        return None
    ids = np.frombuffer(b"".join(tokens), dtype=np.int32)
    if ids.size and not _ids_in_vocab(ids, limits.vocab_size):
        return None
    return GroupInfo(gid, actor, cursor, min(firsts), max(rewards) - min(rewards))


def _switches_ok(vsw: Any, n: int, first: int, last: int) -> bool:
    return type(vsw) is list and bool(vsw) and switches_problem(vsw, n, first, last) is None


def _ids_in_vocab(ids: np.ndarray, vocab_size: int | None) -> bool:
    """Every id >= 0 and below ``vocab_size`` (a negative or out-of-vocabulary id crashes the
    learner's embedding lookup: a device-side assert on CUDA)."""
    ids = ids.ravel()
    if _MIN(ids) < 0:
        return False
    return vocab_size is None or int(_MAX(ids)) < vocab_size


def _group_from_wire_checked(obj: Any, limits: WireLimits) -> Group:
    """The reference validating decoder (one field at a time, then ``Group.validate``): the
    verdict and message for anything ``_check_fast`` does not accept."""
    if not isinstance(obj, dict):
        raise WireError("group: expected a map")
    what = f"group {_clip(repr(obj.get('id')))}"
    raw_responses = _get(obj, "responses", list, what)
    if len(raw_responses) > limits.max_responses:
        raise WireError(f"{what}: {len(raw_responses)} responses exceed {limits.max_responses}")
    temperature, top_p, max_tokens, n = _numbers(obj.get("sampling"), 4, f"{what} sampling")
    if not (math.isfinite(max_tokens) and math.isfinite(n)):
        raise WireError(f"{what} sampling: max_tokens and n must be finite")
    created, finished = _numbers(obj.get("times"), 2, f"{what} times")
    responses = []
    for i, r in enumerate(raw_responses):
        where = f"{what} response {i}"
        if not isinstance(r, dict):
            raise WireError(f"{where}: expected a map")
        first, last = _numbers(r.get("ver"), 2, f"{where} versions")
        if not (isinstance(first, int) and isinstance(last, int)):
            raise WireError(f"{where}: versions must be integers")
        switches = r.get("vsw", [])
        if not isinstance(switches, list) or ("vsw" in r and not switches):
            raise WireError(f"{where}: switches must be a non-empty list")
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
                switches=tuple(switches),
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
    if group.prompt_token_ids.dtype != np.int32:
        raise WireError(f"{what}: prompt token ids must be int32")
    for r in group.responses:
        if r.token_ids.dtype != np.int32 or r.behavior_logprobs.dtype != np.float32:
            raise WireError(f"{what}: token ids must be int32 and log-probs float32")
    for name, ids in (("prompt", group.prompt_token_ids),
                      *((f"response {i}", r.token_ids) for i, r in enumerate(group.responses))):  # fmt: skip
        if ids.ndim != 1:
            raise WireError(f"{what} {name}: token ids must be 1-D")
        if ids.size and not _ids_in_vocab(ids, limits.vocab_size):
            bound = "vocab_size" if limits.vocab_size is None else limits.vocab_size
            raise WireError(f"{what} {name}: token ids must be in [0, {bound}), got "
                            f"[{int(ids.min())}, {int(ids.max())}]")  # fmt: skip
    try:
        group.validate()
    except RecordError as e:
        raise WireError(str(e)) from None
    return group


def _trusted_array(obj: dict) -> np.ndarray:
    a = np.frombuffer(obj["b"], dtype=_DTYPE_OF[obj["dt"]])
    shape = obj["sh"]
    return a if len(shape) == 1 else a.reshape(shape)


_INT32, _FLOAT32 = _DTYPE_OF["int32"], _DTYPE_OF["float32"]
_new_response = object.__new__


def _trusted_response(r: dict) -> Response:
    """``Response(...)`` of a validated response map, at half the cost: a frozen dataclass's
    ``__init__`` sets each field through ``object.__setattr__``; this fills the instance's
    ``__dict__`` in one call (the same fields, the same values; Response has no
    ``__post_init__``). Validated responses hold 1-D int32 token ids and float32 log-probs."""
    response = _new_response(Response)
    first, last = r["ver"]
    response.__dict__.update(
        token_ids=np.frombuffer(r["tok"]["b"], _INT32),
        behavior_logprobs=np.frombuffer(r["lp"]["b"], _FLOAT32),
        reward=float(r["r"]),
        finish_reason=r["fin"],
        first_version=first,
        last_version=last,
        info=r["info"],
        switches=tuple(r["vsw"]) if "vsw" in r else (),
    )
    return response


def group_from_wire_trusted(obj: dict) -> Group:
    """A Group from a map that a replay server validated when it was inserted (a group of its
    ``batch`` reply), without checking it again. Equal to what ``group_from_wire`` returns
    for the same map. Only for replies of the replay server: anything else must go through
    ``group_from_wire``. A damaged map may raise any exception here, not WireError."""
    s, t = obj["sampling"], obj["times"]
    return Group(
        group_id=obj["id"],
        prompt_id=obj["pid"],
        prompt_token_ids=_trusted_array(obj["prompt"]),
        task=obj["task"],
        responses=tuple([_trusted_response(r) for r in obj["responses"]]),
        actor_id=obj["actor"],
        cursor=obj["cursor"],
        sampling=SamplingParams(float(s[0]), float(s[1]), int(s[2]), int(s[3])),
        created_at=float(t[0]),
        finished_at=float(t[1]),
    )


def unpack_group(data: Any, limits: WireLimits = WireLimits()) -> tuple[dict, GroupInfo]:
    """Validate the msgpack bytes of one group (as ``pack_group`` makes them) as
    ``group_from_wire`` would; -> (its map, its info). Raises WireError when malformed."""
    if not isinstance(data, bytes):
        raise WireError(f"group: expected msgpack bytes, got {type(data).__name__}")
    try:
        obj = _unpack(data, limits)
    except Exception as e:  # msgpack raises many types for bad input; report them as one
        raise WireError(f"group: not valid msgpack: {type(e).__name__}: {e}") from None
    return obj, check_group(obj, limits)


class Packed(list):
    """A list of already encoded msgpack objects (e.g. a server's stored groups): ``encode``
    sends it as one msgpack array of them, spliced in as they are, never re-encoded."""


def encode(msg_type: str, **fields: Any) -> bytes:
    """One message: the schema version, its type and its fields (a ``Packed`` field is
    spliced in as it is)."""
    msg = {"v": SCHEMA_VERSION, "t": msg_type, **fields}
    if not any(type(v) is Packed for v in fields.values()):
        return msgpack.packb(msg, use_bin_type=True)
    packer = msgpack.Packer(use_bin_type=True)
    parts = [packer.pack_map_header(len(msg))]
    for key, value in msg.items():
        parts.append(packer.pack(key))
        if type(value) is Packed:
            parts.append(packer.pack_array_header(len(value)))
            parts.extend(value)
        else:
            parts.append(packer.pack(value))
    return b"".join(parts)


MAX_MAP_LEN = 64  # entries of any one map: a reply's maps must have bounded key sets
MAX_STR_LEN = 1 << 20


def max_array_len(limits: WireLimits) -> int:
    """The longest list a message may hold: a reply lists at most this many items."""
    return max(limits.max_groups, limits.max_responses, 64)


# at most one list or map per this many bytes of a message (plus a small allowance): an
# empty container is one byte of msgpack and ~60 of Python, so 4 MiB of nested empty lists
# took 289 MB and 2.5 s to decode; real messages have 14+ bytes per container (a group of
# empty responses) and ~300 (responses of 256 tokens)
BYTES_PER_CONTAINER = 8
CONTAINER_ALLOWANCE = 1024
UNCOUNTED_BYTES = 1 << 18  # below this the worst case is small: no per-container hook cost


class _Budget:
    """Counts the containers msgpack builds and stops the decode past the budget."""

    __slots__ = ("left",)

    def __init__(self, n: int):
        self.left = n

    def __call__(self, obj):
        self.left -= 1
        if self.left < 0:
            raise WireError("message holds too many lists and maps for its size")
        return obj


def _unpack(data: bytes, limits: WireLimits, count: bool = True) -> Any:
    budget = None  # at most ~256 K containers below UNCOUNTED_BYTES: ~15 MB, not counted
    if count and len(data) > UNCOUNTED_BYTES:
        budget = _Budget(CONTAINER_ALLOWANCE + len(data) // BYTES_PER_CONTAINER)
    return msgpack.unpackb(
        data,
        raw=False,
        strict_map_key=True,
        max_bin_len=limits.max_message_bytes,
        max_str_len=MAX_STR_LEN,
        max_array_len=max_array_len(limits),
        max_map_len=MAX_MAP_LEN,
        max_ext_len=0,
        list_hook=budget,
        object_hook=budget,
    )


def decode(data: bytes, limits: WireLimits = WireLimits(),
           count_containers: bool = True) -> tuple[str, dict]:  # fmt: skip
    """-> (type, fields). Raises WireError for anything malformed, and nothing else.
    ``count_containers=False``: no container budget (a client decoding its server's
    replies: the server is the one it chose and, with CURVE, authenticated)."""
    if len(data) > limits.max_message_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds {limits.max_message_bytes}")
    try:
        obj = _unpack(data, limits, count_containers)
    except Exception as e:  # msgpack raises many types for bad input; report them as one
        raise WireError(f"not a valid msgpack message: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise WireError("message must be a map")
    if type(obj.get("v")) is not int or obj["v"] not in READABLE_SCHEMAS:  # True == 1 in Python
        raise WireError(f"schema version {_clip(repr(obj.get('v')))} is not one of "
                        f"{READABLE_SCHEMAS}")  # fmt: skip
    msg_type = obj.get("t")
    if not isinstance(msg_type, str):
        raise WireError("message has no type")
    return msg_type, obj
