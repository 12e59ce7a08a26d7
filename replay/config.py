"""The replay server's settings, and the command line that sets them
(``python -m flowrl_async.replay.server --help``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from flowrl_async.replay.rate_limiter import RateLimiter

ADMISSIONS = ("learner", "weights")


@dataclass
class ServerConfig:
    directory: str
    address: str = "tcp://127.0.0.1:5555"
    capacity: int = 10_000
    max_staleness: int | None = 1
    selector: str = "fifo"
    max_times_sampled: int = 1
    groups_per_version: int = 8  # learner batch size × publish interval, for admission
    # admission counts from the asking actor's weights when older than the learner's version
    # ("weights": nothing generated is evicted as stale) or from the learner's version
    # ("learner", AReaL's formula); measured in the main job, 4 seeds each: stale evictions
    # 12.6-14.0% -> 0, training time -10%, the same accuracy within the seed spread
    admission: str = "weights"
    fsync: str = "interval"
    fsync_interval_ms: float = 10.0
    segment_bytes: int = 64 * 1024 * 1024
    seed: int = 0
    fresh_fraction: float = 1.0  # the mixed selector: share of never-sampled groups per batch
    # rate limiter (Reverb's SampleToInsertRatio, see rate_limiter.py); None: no limiter
    samples_per_insert: float | None = None
    min_size_to_sample: int = 1
    error_buffer: float | None = None  # None: max(1, spi) + min_size_to_sample, which
    # allows every batch size up to min_size_to_sample
    insert_timeout_ms: int = 60_000  # the longest an insert is held, unless it says
    # ZeroMQ CURVE (replay/curve.py): the server's secret certificate file turns it on;
    # with a directory of client public certificates, only those clients may connect
    curve_secret_key: str | None = None
    curve_authorized_keys: str | None = None

    def __post_init__(self):
        if self.admission not in ADMISSIONS:
            raise ValueError(f"admission={self.admission!r}: expected one of {ADMISSIONS}")

    def rate_limiter(self) -> RateLimiter | None:
        spi = self.samples_per_insert
        if spi is None:
            return None
        eb = self.error_buffer
        eb = max(1.0, spi) + self.min_size_to_sample if eb is None else eb
        return RateLimiter(spi, self.min_size_to_sample, eb)


def parse_args(argv: list[str] | None, description: str) -> ServerConfig:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dir", required=True)
    p.add_argument("--address", default="tcp://127.0.0.1:5555", help="port 0: pick a free one")
    p.add_argument("--capacity", type=int, default=10_000)
    p.add_argument("--max-staleness", type=int, default=1, help="-1 for no bound")
    p.add_argument("--selector", default="fifo")
    p.add_argument("--max-times-sampled", type=int, default=1)
    p.add_argument("--groups-per-version", type=int, default=8)
    p.add_argument("--admission", default="weights", choices=ADMISSIONS)
    p.add_argument("--fsync", default="interval")
    p.add_argument("--fsync-interval-ms", type=float, default=10.0)
    p.add_argument("--segment-bytes", type=int, default=64 * 1024 * 1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh-fraction", type=float, default=1.0, help="selector mixed")
    p.add_argument(
        "--samples-per-insert", type=float, default=None, help="enables the rate limiter"
    )
    p.add_argument("--min-size-to-sample", type=int, default=1)
    p.add_argument("--error-buffer", type=float, default=None)
    p.add_argument("--insert-timeout-ms", type=int, default=60_000)
    p.add_argument(
        "--curve-secret-key", default=None, help="the server's CURVE secret certificate file"
    )
    p.add_argument(
        "--curve-authorized-keys",
        default=None,
        help="a directory of client public certificates: only those may connect",
    )
    a = p.parse_args(argv)
    return ServerConfig(
        directory=a.dir,
        address=a.address,
        capacity=a.capacity,
        max_staleness=None if a.max_staleness < 0 else a.max_staleness,
        selector=a.selector,
        max_times_sampled=a.max_times_sampled,
        groups_per_version=a.groups_per_version,
        admission=a.admission,
        fsync=a.fsync,
        fsync_interval_ms=a.fsync_interval_ms,
        segment_bytes=a.segment_bytes,
        seed=a.seed,
        fresh_fraction=a.fresh_fraction,
        samples_per_insert=a.samples_per_insert,
        min_size_to_sample=a.min_size_to_sample,
        error_buffer=a.error_buffer,
        insert_timeout_ms=a.insert_timeout_ms,
        curve_secret_key=a.curve_secret_key,
        curve_authorized_keys=a.curve_authorized_keys,
    )
