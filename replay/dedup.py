"""Exactly-once inserts in bounded memory: which group ids the buffer has accepted.

A group id ``<producer>-<seq>`` (``records.GroupIds``: the producer is 32 lowercase hex
digits drawn once per rollout process, the seq counts its groups from 0) is remembered by its
producer's window: the highest seq accepted (``high``) and, of the ``window`` seqs below it,
which were not accepted yet (the gaps: groups built but rejected, dropped at a stop, or still
on their way), as ranges. A seq below the window (``floor = high - window``) can no longer
be told from a retry: such a group is refused (``EXPIRED``, an error reply, never an
acknowledgement). It was never acknowledged, or it was and is kept: either way nothing
acknowledged is lost and nothing is held twice. An actor pushes its groups in order, with at
most a few dozen in flight, so its retries fall well inside the window. Memory: per
producer its window and gap ranges (at most ``window / 2`` of them, one for any jump ahead),
whatever the number of groups.

Any other id (hand-made groups, older clients) is remembered as is, in ``legacy``: one
entry per group, counted in the service's stats (``dedup_legacy_ids``).
"""

from __future__ import annotations

import bisect
import re

NEW, SEEN, EXPIRED = "new", "seen", "expired"
WINDOW = 1024
_ID = re.compile(r"([0-9a-f]{32})-(0|[1-9][0-9]{0,17})")  # seq < 10^18: a plain int


def split_id(group_id: str) -> tuple[str, int] | None:
    """(producer, seq) of a producer id; None for any other id."""
    m = _ID.fullmatch(group_id)
    return None if m is None else (m[1], int(m[2]))


class Window:
    """One producer's accepted seqs: all up to ``high`` except the ``gaps`` (sorted,
    disjoint ``[lo, hi)`` ranges inside ``[floor, high)``); below ``floor``: unknown."""

    __slots__ = ("high", "floor", "gaps")

    def __init__(self, high: int = -1, floor: int = 0, gaps: list | None = None):
        self.high, self.floor, self.gaps = high, floor, gaps if gaps is not None else []

    def status(self, seq: int, floor: int | None = None) -> str:
        if seq < max(self.floor, floor or 0):
            return EXPIRED
        if seq > self.high:
            return NEW
        i = bisect.bisect_right(self.gaps, [seq, float("inf")]) - 1  # the range starting <= seq
        return NEW if i >= 0 and seq < self.gaps[i][1] else SEEN

    def add(self, seq: int, window: int) -> None:
        if seq > self.high:
            if seq > self.high + 1:
                self.gaps.append([self.high + 1, seq])
            self.high = seq
            self.floor = max(self.floor, seq - window)
            while self.gaps and self.gaps[0][1] <= self.floor:  # wholly forgotten
                self.gaps.pop(0)
            if self.gaps and self.gaps[0][0] < self.floor:
                self.gaps[0][0] = self.floor
            return
        i = bisect.bisect_right(self.gaps, [seq, float("inf")]) - 1
        lo, hi = self.gaps[i]  # status was NEW: seq lies in this range
        self.gaps[i : i + 1] = [r for r in ([lo, seq], [seq + 1, hi]) if r[0] < r[1]]


class Dedup:
    """The accepted group ids: a window per producer, and the legacy ids as they are."""

    def __init__(self, window: int = WINDOW):
        self.window = window
        self.producers: dict[str, Window] = {}
        self.legacy: set[str] = set()

    def status(self, group_id: str, pending: dict | None = None) -> str:
        """NEW, SEEN or EXPIRED. ``pending``: producer -> the highest seq accepted earlier
        in the same message, not applied yet (its window moves once they are)."""
        split = split_id(group_id)
        if split is None:
            return SEEN if group_id in self.legacy else NEW
        producer, seq = split
        known = self.producers.get(producer)
        ahead = (pending or {}).get(producer)
        floor = None if ahead is None else ahead - self.window
        if known is None:
            return EXPIRED if floor is not None and seq < floor else NEW
        return known.status(seq, floor)

    def add(self, group_id: str) -> None:
        """Remember an accepted id (one whose status was NEW)."""
        split = split_id(group_id)
        if split is None:
            self.legacy.add(group_id)
            return
        producer, seq = split
        self.producers.setdefault(producer, Window()).add(seq, self.window)

    def __eq__(self, other) -> bool:
        return isinstance(other, Dedup) and self.snapshot() == other.snapshot()

    def __contains__(self, group_id: str) -> bool:
        return self.status(group_id) != NEW

    def __len__(self) -> int:
        """Entries held: producers, their gap ranges and legacy ids (the memory bound)."""
        gaps = sum(len(w.gaps) for w in self.producers.values())
        return len(self.producers) + gaps + len(self.legacy)

    def snapshot(self) -> dict:
        return {
            "producers": [
                [p, w.high, w.floor, [list(r) for r in w.gaps]]
                for p, w in sorted(self.producers.items())
            ],  # fmt: skip
            "legacy": sorted(self.legacy),
        }

    @classmethod
    def restore(cls, snap: dict | None, seen: list | None = None) -> Dedup:
        """From ``snapshot()``, or from a checkpoint that kept every id (``seen``), in order."""
        out = cls()
        if snap is not None:
            out.producers = {
                p: Window(h, f, [list(r) for r in g]) for p, h, f, g in snap["producers"]
            }
            out.legacy = set(snap["legacy"])
        for gid in seen or ():
            out.add(gid)
        return out
