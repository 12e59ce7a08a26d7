"""The replay service's settings, defined once: ``ReplaySettings`` (what a user tunes; the run
config's ``replay`` section derives from it), ``ServerConfig`` (one server: the settings plus
where it lives and what the run tells it), and the command line generated from the fields
(``python -m flowrl_async.replay.server --help``)."""

from __future__ import annotations

import argparse
import ast
import inspect
import textwrap
import types
import typing
from dataclasses import MISSING, dataclass, fields

from flowrl_async.replay.rate_limiter import RateLimiter

ADMISSIONS = ("learner", "weights")
SELECTORS = ("fifo", "uniform", "prioritized", "mixed")
FSYNC = ("always", "interval", "never")
RETAIN = ("all", "needed")


@dataclass(kw_only=True)
class ReplaySettings:
    """What a user tunes about the replay service."""

    capacity: int = 10_000
    """Most groups held; the oldest are evicted beyond it."""
    capacity_bytes: int | None = None
    """Most bytes of groups held (their wire size); the oldest are evicted beyond it (null:
    only ``capacity`` bounds the buffer)."""
    max_staleness: int | None = 1
    """Groups more than this many versions behind the learner are never trained (null: no
    bound; -1 on the command line)."""
    selector: str = "fifo"
    """fifo (each group once, streaming), uniform, prioritized (by reward spread), or mixed
    (fresh groups plus groups replayed from those already trained on)."""
    priority_half_life: float | None = None
    """selector=prioritized: weight each group's reward spread by 2^(−staleness / this),
    staleness in versions (freshness-aware priority); null: the spread alone."""
    max_times_sampled: int = 1
    """A group leaves the buffer after this many samples."""
    admission: str = "weights"
    """How many groups actors may start: AReaL's (max_staleness + version + 1)·batch −
    (accepted + in flight), with version the asking actor's weights when older than the
    learner's (weights: nothing generated is evicted as stale), or always the learner's
    (learner: fresher groups may be picked from a surplus)."""
    admission_lead: int = 1
    """With max_staleness null (off-policy trajectory balance): how far actors may run ahead
    of the learner, in versions. AReaL's formula takes it as its bound (a set max_staleness
    takes its place); with selector=mixed admission keeps max(a batch, (lead + 1) versions'
    fresh share) of never-trained groups held or in flight. 1 keeps what is trained fresh;
    under a long tail of lengths a larger lead keeps the learner fed (``flowrl-async
    simulate`` shows how much)."""
    fresh_fraction: float = 1.0
    """selector=mixed: the share of each batch taken from never-trained groups; the rest is
    replayed uniformly (off-policy trajectory balance, e.g. with algo=flowrl_tb)."""
    fsync: str = "interval"
    """Log durability: always (fsync every record), interval, or never."""
    fsync_interval_ms: float = 10.0
    """With fsync=interval: the longest an acknowledged record waits for its fsync."""
    segment_bytes: int = 64 * 1024 * 1024
    """Size at which the log rolls to a new segment file."""
    retain: str = "all"
    """Log retention: all (every segment stays: ``flowrl-async replay RUN`` and
    ``replay.preload`` read the whole history) or needed (after each checkpoint, segments
    below what the live state and every kept checkpoint still read are deleted, so disk use
    follows what is held; recovery then needs an intact checkpoint)."""
    checkpoint_every_mb: float | None = 256.0
    """The service checkpoints itself after this much log since its last checkpoint (its
    own or the learner's), so a restart replays at most about this much log; it keeps its
    two newest such checkpoints. null: only the learner's checkpoints."""
    samples_per_insert: float | None = None
    """Rate limiter (Reverb's SampleToInsertRatio): target sampled groups per inserted group;
    null disables it (admission control alone paces the actors)."""
    min_size_to_sample: int = 1
    """Rate limiter: groups inserted before the first sample is served."""
    error_buffer: float | None = None
    """Rate limiter: allowed drift from the ratio, in groups (null: max(1, spi) + min size,
    which allows every batch size up to min_size_to_sample)."""
    insert_timeout_ms: int = 60_000
    """Rate limiter: the longest an insert is held (unless it says) before the actor gets an
    error (and retries)."""
    curve_secret_key: str | None = None
    """ZeroMQ CURVE encryption of the replay socket: the server's secret certificate file
    (make one with ``python -m flowrl_async.replay.curve DIR NAME``); null: plain TCP."""
    insecure: bool = False
    """Allow a plain-TCP (no CURVE) service on an address other than loopback: any peer
    that reaches it could insert made-up rewards, drain batches, rewind or prune. Refused
    unless set."""
    curve_authorized_keys: str | None = None
    """A directory of client public certificates: only those clients may connect (null:
    anyone who knows the server's public key)."""

    def __post_init__(self):
        if self.admission not in ADMISSIONS:
            raise ValueError(f"admission={self.admission!r}: expected one of {ADMISSIONS}")
        if self.retain not in RETAIN:
            raise ValueError(f"retain={self.retain!r}: expected one of {RETAIN}")
        if self.priority_half_life is not None and not self.priority_half_life > 0:
            raise ValueError(f"priority_half_life must be > 0, got {self.priority_half_life}")
        if self.admission_lead < 0:
            raise ValueError(f"admission_lead must be >= 0, got {self.admission_lead}")


@dataclass
class ServerConfig(ReplaySettings):
    """One replay server: the tunable settings plus where it lives and what the run tells it."""

    directory: str
    """The service's directory: its segment log and checkpoints."""
    address: str = "tcp://127.0.0.1:5555"
    """The zmq address it binds (port 0: a free one, printed at start)."""
    groups_per_version: int = 8
    """Groups the learner trains per published version (batch × publish interval): admission
    counts in these."""
    seed: int = 0
    """Seed of the selectors' sampling."""
    vocab_size: int | None = None
    """Token ids of inserted groups must be below it (the run sets it from the model; a
    poison id would crash the learner on every resume); null: only >= 0 is checked."""
    max_version_jump: int = 1000
    """The most a version message may raise the version above the newer of the current
    version and the newest group's: a bogus version (2**63) would evict everything and
    refuse every actor for good."""
    max_admit: int = 1024
    """The most prompt positions one admission request may ask for."""
    max_held: int = 4096
    """The most inserts (and, apart, samples) held waiting at once; beyond it an insert is
    refused (the actor retries) and a sample answered empty (the learner asks again)."""

    def rate_limiter(self) -> RateLimiter | None:
        spi = self.samples_per_insert
        if spi is None:
            return None
        eb = self.error_buffer
        eb = max(1.0, spi) + self.min_size_to_sample if eb is None else eb
        return RateLimiter(spi, self.min_size_to_sample, eb)


def settings_of(source, cls=ReplaySettings) -> dict:
    """The values of ``cls``'s fields that ``source`` (any object with them) holds."""
    return {f.name: getattr(source, f.name) for f in fields(cls)}


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of ``cls`` and its bases (attribute docstrings)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:], strict=False):
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr):
                if isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                    docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _boolean(text: str) -> bool:
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text.lower() not in words:
        raise ValueError(f"expected true or false, got {text!r}")
    return words[text.lower()]


def _parser_type(annotation: str):
    """str / int / float (and ``X | None``: the same, "none" or "null" for None)."""
    hint = eval(annotation, {}, {})  # the annotations here are builtins only  # noqa: S307
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if isinstance(hint, types.UnionType) else hint
    if base is bool:  # bool("false") is True: parse the words
        base = _boolean
    if not isinstance(hint, types.UnionType):
        return base

    def parse(text: str):
        return None if text.lower() in ("none", "null") else base(text)

    parse.__name__ = base.__name__
    return parse


CHOICES = {"admission": ADMISSIONS, "selector": SELECTORS, "fsync": FSYNC, "retain": RETAIN}


def parse_args(argv: list[str] | None, description: str) -> ServerConfig:
    """ServerConfig from a command line: one ``--flag`` per field, with its docstring."""
    p = argparse.ArgumentParser(description=description)
    docs = field_docs(ServerConfig)
    for f in fields(ServerConfig):
        flags = [f"--{f.name.replace('_', '-')}"] + (["--dir"] if f.name == "directory" else [])
        kw = dict(help=docs.get(f.name, ""), dest=f.name, type=_parser_type(f.type))
        if f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        if f.default is MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default
            kw["help"] += f" (default: {f.default})"
        p.add_argument(*flags, **kw)
    values = vars(p.parse_args(argv))
    if values["max_staleness"] is not None and values["max_staleness"] < 0:
        values["max_staleness"] = None  # -1: no bound
    return ServerConfig(**values)
