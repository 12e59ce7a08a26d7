"""Which stored groups to read (``GroupFilter``) and the parsers of its bounds; what the run
config's ``replay.preload_*`` keys and ``flowrl-async replay``'s flags both build."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from flowrl_async.records import Group


@dataclass(frozen=True)
class GroupFilter:
    """Which stored groups to read; every bound inclusive, None: no bound. A group's version
    is its oldest weight version (``Group.min_version``); times are insert times (unix s)."""

    min_version: int | None = None
    max_version: int | None = None
    since: float | None = None
    until: float | None = None
    task: str | None = None

    def __post_init__(self):
        lo, hi = self.min_version, self.max_version
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"empty version range {lo}..{hi}")
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError(f"empty time range: since {self.since} is after until {self.until}")

    @property
    def narrows(self) -> bool:
        """False when it keeps every group."""
        return self != GroupFilter()

    def keeps_time(self, at: float) -> bool:
        return (self.since is None or at >= self.since) and (self.until is None or at <= self.until)

    def keeps(self, group: Group) -> bool:
        v = group.min_version
        return (
            (self.min_version is None or v >= self.min_version)
            and (self.max_version is None or v <= self.max_version)
            and (self.task is None or group.task == self.task)
        )


def parse_time(value: str | float | None) -> float | None:
    """Unix seconds, or an ISO 8601 time (``2026-11-29T09:30``, local time unless it names
    its zone); None stays None."""
    if value is None or isinstance(value, int | float):
        return value
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ValueError(f"not a time: {value!r} (unix seconds or ISO 8601)") from None


def parse_versions(value: str | None) -> tuple[int | None, int | None]:
    """ "3" -> (3, 3); "3:" -> (3, None); ":7" -> (None, 7); "3:7" -> (3, 7)."""
    if value is None:
        return None, None
    lo, sep, hi = value.partition(":")
    try:
        lo_v = int(lo) if lo else None
        hi_v = (int(hi) if hi else None) if sep else lo_v
    except ValueError:
        raise ValueError(f"not a version range: {value!r} (e.g. 3, 3:7, 3:, :7)") from None
    return lo_v, hi_v
