"""The replay service's runtime figures (counted since its process started; the buffer's own
counters, which recovery restores, are in ``Counters``).

- rejected requests by reason: ``frames`` (not one message frame), ``undecodable`` (not a
  valid message: size, msgpack, schema version, type), ``bad_<type>`` (a known request
  with bad fields), ``unknown_type``, ``bad_group`` (one group of an ``insert_batch``),
  ``forbidden`` (a request its key's role may not make: replay/curve.py);
- the staleness of every group handed to the learner, as a histogram with a fixed set of
  buckets (``STALENESS_BUCKETS``: 0…15 one each, then powers of two up to ``1024+``;
  ``ahead``: groups made by weights numbered after the learner's, which only a rewind leaves
  behind);
- the rate limiter's waits: requests held, and the seconds they waited in all;
- inserts/s and sampled groups/s over the last ``RATE_WINDOW_S`` seconds.
"""

from __future__ import annotations

from collections import Counter, deque
from numbers import Real

from flowrl_async.replay.protocol import REQUESTS

RATE_WINDOW_S = 10.0
# Every map of the stats reply has a bounded, data-independent key set, so the reply always
# fits the decoder's limits (wire.MAX_MAP_LEN) however long a run lasts.
REASONS = ("frames", "undecodable", "unknown_type", "bad_group", "forbidden", "other")
REASONS += tuple(f"bad_{t}" for t in REQUESTS)
EXACT_UP_TO = 16  # staleness 0..15 get a bucket each; then [16, 32), [32, 64), ... 1024+
STALENESS_BUCKETS = tuple(str(s) for s in range(EXACT_UP_TO))
STALENESS_BUCKETS += ("16-31", "32-63", "64-127", "128-255", "256-511", "512-1023", "1024+")
STALENESS_BUCKETS += ("ahead",)


def staleness_bucket(staleness: int) -> str:
    """The histogram bucket of one sampled group's staleness (negative: ``ahead``)."""
    if staleness < 0:
        return "ahead"
    if staleness < EXACT_UP_TO:
        return STALENESS_BUCKETS[staleness]
    if staleness >= 1024:
        return "1024+"
    low = 1 << (staleness.bit_length() - 1)
    return f"{low}-{2 * low - 1}"


class ServiceMetrics:
    """The service's runtime figures since its process started."""

    def __init__(self):
        self.rejected_by: Counter[str] = Counter()
        self.sampled_staleness: Counter[str] = Counter()  # keys: STALENESS_BUCKETS
        self.inserts = self.samples = 0  # since start: a rewind does not move them back
        self.inserts_held = self.samples_held = 0
        self.insert_wait_s = self.sample_wait_s = 0.0
        self._marks: deque[tuple[float, int, int]] = deque()  # (time, inserted, sampled)

    def rejected(self, reason: str) -> None:
        self.rejected_by[reason if reason in REASONS else "other"] += 1

    def inserted(self, n: int) -> None:
        self.inserts += n

    def sampled(self, staleness: list[int]) -> None:
        self.samples += len(staleness)
        self.sampled_staleness.update(staleness_bucket(s) for s in staleness)

    def waited(self, kind: str, seconds: float) -> None:
        """A held ``insert`` or ``sample`` was answered (or timed out) after ``seconds``."""
        if kind == "insert":
            self.inserts_held += 1
            self.insert_wait_s += seconds
        else:
            self.samples_held += 1
            self.sample_wait_s += seconds

    def mark(self, now: float) -> None:
        """Note the counters (at most once a second; the serving loop calls it often)."""
        if self._marks and now - self._marks[-1][0] < 1.0:
            return
        self._marks.append((now, self.inserts, self.samples))
        while len(self._marks) > 2 and now - self._marks[1][0] >= RATE_WINDOW_S:
            self._marks.popleft()

    def rates(self, now: float) -> tuple[float, float]:
        """(inserts/s, sampled groups/s) since the oldest mark of the window; 0 without one."""
        if not self._marks or now <= self._marks[0][0]:
            return 0.0, 0.0
        t0, i0, s0 = self._marks[0]
        return (self.inserts - i0) / (now - t0), (self.samples - s0) / (now - t0)

    def as_dict(self, now: float) -> dict:
        inserts_per_s, samples_per_s = self.rates(now)
        return {
            "inserts_per_s": inserts_per_s,
            "sampled_groups_per_s": samples_per_s,
            "rejected_by": dict(sorted(self.rejected_by.items())),
            "sampled_staleness": {  # in bucket order, only buckets that were hit
                k: self.sampled_staleness[k]
                for k in STALENESS_BUCKETS
                if k in self.sampled_staleness
            },
            "inserts_held": self.inserts_held,
            "insert_wait_s": self.insert_wait_s,
            "samples_held": self.samples_held,
            "sample_wait_s": self.sample_wait_s,
        }


def flat(stats: dict, prefix: str = "replay_") -> dict[str, float]:
    """The numbers of a ``stats`` reply as one flat map for metrics.jsonl / TensorBoard:
    ``{"size": 3, "rejected_by": {"frames": 1}}`` -> ``{"replay_size": 3,
    "replay_rejected_by_frames": 1}``; strings are left out."""
    out: dict[str, float] = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}_"))
        elif isinstance(value, Real) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out
