"""A samples-per-insert rate limiter with Reverb's ``SampleToInsertRatio`` semantics.

Counters: ``inserts`` (groups accepted) and ``samples`` (groups handed to the learner; a batch
of B counts B). With ``spi`` = samples per insert and ``size`` = groups the buffer holds now
(Reverb's inserts − deletes: removals of any kind lower it):

    diff     = inserts·spi − samples
    min_diff = min_size_to_sample·spi − error_buffer
    max_diff = min_size_to_sample·spi + error_buffer

- an insert may go ahead when ``size + 1 <= min_size_to_sample`` (filling up is never held),
  or else when ``(inserts + 1)·spi − samples <= max_diff``;
- a batch of B may be sampled when ``size >= min_size_to_sample`` and
  ``inserts·spi − samples − B >= min_diff``.

No deadlock (the rule the constructor and ``check_batch`` enforce). Both sides wait only if
``size >= min_size`` (else inserts go), ``diff > max_diff − spi`` (inserts wait) and
``diff < min_diff + B`` (samples of B wait; a batch also waits while fewer than B groups are
eligible, which ``B <= min_size <= size`` rules out). So a state where both wait exists only
when ``max_diff − spi < min_diff + B``, i.e. never when

    2·error_buffer = max_diff − min_diff >= spi + B    and    B <= min_size_to_sample.

The constructor requires Reverb's ``error_buffer >= max(1, spi)`` (so B = 1 is always
safe); ``check_batch(B)`` rejects a batch size that breaks the rule above. The rule treats
diff as a real number, so it is tight for a non-integer spi and error_buffer and
conservative when every diff is an integer (spi 1, error_buffer 2, B 4 is refused although
no integer lies in (5, 6)). Comparisons are exact floating point, as in Reverb: prefer spi
values that are exact in binary (0.5, 2, 1.25).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RateLimiter:
    """Reverb's SampleToInsertRatio: keeps sampled per inserted groups near a target."""

    samples_per_insert: float
    min_size_to_sample: int
    error_buffer: float
    inserts: int = 0
    samples: int = 0

    def __post_init__(self) -> None:
        spi = self.samples_per_insert
        if not spi > 0:
            raise ValueError(f"samples_per_insert must be > 0, got {spi}")
        if self.min_size_to_sample < 1:
            raise ValueError(f"min_size_to_sample must be >= 1, got {self.min_size_to_sample}")
        if not self.error_buffer >= max(1.0, spi):
            raise ValueError(
                f"error_buffer {self.error_buffer} < max(1, samples_per_insert {spi}): "
                "inserts and samples could both be held forever (deadlock); "
                "use error_buffer >= max(1, samples_per_insert) + batch size"
            )

    @property
    def min_diff(self) -> float:
        return self.min_size_to_sample * self.samples_per_insert - self.error_buffer

    @property
    def max_diff(self) -> float:
        return self.min_size_to_sample * self.samples_per_insert + self.error_buffer

    @property
    def diff(self) -> float:
        return self.inserts * self.samples_per_insert - self.samples

    def can_insert(self, size: int) -> bool:
        if size + 1 <= self.min_size_to_sample:
            return True
        return (self.inserts + 1) * self.samples_per_insert - self.samples <= self.max_diff

    def can_sample(self, batch_size: int, size: int) -> bool:
        if size < self.min_size_to_sample:
            return False
        return self.diff - batch_size >= self.min_diff

    def check_batch(self, batch_size: int) -> None:
        """Raise ValueError for a batch size that could leave inserts and samples both held."""
        if batch_size > self.min_size_to_sample:
            raise ValueError(
                f"batch_size {batch_size} > min_size_to_sample {self.min_size_to_sample}: "
                "the rate limiter could hold inserts while too few groups remain to sample"
            )
        if batch_size + self.samples_per_insert > 2 * self.error_buffer:
            raise ValueError(
                f"batch_size {batch_size} + samples_per_insert {self.samples_per_insert} > "
                f"2·error_buffer {2 * self.error_buffer}: inserts and samples could both be "
                "held forever"
            )

    def record_insert(self) -> None:
        self.inserts += 1

    def record_sample(self, n: int) -> None:
        self.samples += n

    def why_insert_waits(self, size: int) -> str:
        return (
            f"rate limiter: {size} groups held (min_size_to_sample {self.min_size_to_sample}) "
            f"and inserts·spi − samples = {self.diff:g} would pass max_diff {self.max_diff:g} "
            f"(samples_per_insert {self.samples_per_insert:g}): the learner is not sampling"
        )
