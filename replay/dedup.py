"""Exactly-once inserts in bounded memory: which group ids the buffer has accepted.

A group id ``<producer>-<seq>`` (``records.GroupIds``: the producer is 32 lowercase hex
digits drawn once per rollout process, the seq counts its groups from 0) is remembered by its
producer's watermark: the highest seq accepted and the seqs below it not accepted yet (the
gaps: groups built but rejected, dropped at a stop, or still on their way), at most
``max_gaps`` of them. When more gaps open, the lowest are forgotten: a group that comes
after its seq was forgotten is refused (``EXPIRED``, an error reply, never an
acknowledgement), since the service can no longer tell a new group from a retry. It was
never acknowledged, or it is held already: either way nothing acknowledged is lost and
nothing is held twice. Memory: one entry per producer plus its open gaps, whatever the
number of groups.

Any other id (hand-made groups, older clients) is remembered as is, in ``legacy``: one
entry per group, counted in the service's stats (``dedup_legacy_ids``).
"""

from __future__ import annotations

import re

NEW, SEEN, EXPIRED = "new", "seen", "expired"
MAX_GAPS = 1024
_ID = re.compile(r"([0-9a-f]{32})-(0|[1-9][0-9]{0,17})")  # seq < 10^18: a plain int


class Dedup:
    """The accepted group ids: a watermark per producer, and the legacy ids as they are."""

    def __init__(self, max_gaps: int = MAX_GAPS):
        self.max_gaps = max_gaps
        # producer -> [high, floor, gaps]: the highest seq accepted; below ``floor`` nothing
        # is known any more; the seqs in [floor, high) not accepted yet
        self.producers: dict[str, list] = {}
        self.legacy: set[str] = set()

    def status(self, group_id: str) -> str:
        m = _ID.fullmatch(group_id)
        if m is None:
            return SEEN if group_id in self.legacy else NEW
        known = self.producers.get(m[1])
        if known is None:
            return NEW
        seq, (high, floor, gaps) = int(m[2]), known
        if seq > high or seq in gaps:
            return NEW
        return EXPIRED if seq < floor else SEEN

    def add(self, group_id: str) -> None:
        """Remember an accepted id (one whose status was NEW)."""
        m = _ID.fullmatch(group_id)
        if m is None:
            self.legacy.add(group_id)
            return
        producer, seq = m[1], int(m[2])
        known = self.producers.setdefault(producer, [-1, 0, set()])
        high, floor, gaps = known
        moved = False
        if seq > high:
            if seq - self.max_gaps > floor:  # gaps beyond the bound: forgotten
                floor, moved = seq - self.max_gaps, True
            gaps.update(range(max(high + 1, floor), seq))
            high = seq
        gaps.discard(seq)
        if moved or len(gaps) > self.max_gaps:
            ordered = sorted(g for g in gaps if g >= floor)
            cut = max(0, len(ordered) - self.max_gaps)  # the lowest beyond the bound
            if cut:
                floor = ordered[cut - 1] + 1
            gaps = set(ordered[cut:])
        known[:] = high, floor, gaps

    def __eq__(self, other) -> bool:
        return isinstance(other, Dedup) and self.snapshot() == other.snapshot()

    def __contains__(self, group_id: str) -> bool:
        return self.status(group_id) != NEW

    def __len__(self) -> int:
        """Entries held: producers, their gaps and legacy ids (the memory bound)."""
        gaps = sum(len(g) for _, _, g in self.producers.values())
        return len(self.producers) + gaps + len(self.legacy)

    def snapshot(self) -> dict:
        return {
            "producers": [[p, h, f, sorted(g)] for p, (h, f, g) in sorted(self.producers.items())],
            "legacy": sorted(self.legacy),
        }

    @classmethod
    def restore(cls, snap: dict | None, seen: list | None = None) -> Dedup:
        """From ``snapshot()``, or from a checkpoint that kept every id (``seen``), in order."""
        out = cls()
        if snap is not None:
            out.producers = {p: [h, f, set(g)] for p, h, f, g in snap["producers"]}
            out.legacy = set(snap["legacy"])
        for gid in seen or ():
            out.add(gid)
        return out
