"""Reading a stored run: the groups a replay service acknowledged, from its segment log.

``read_log(directory)`` yields every intact record in order (torn or corrupt frames are
skipped and counted, as in recovery, but nothing is truncated: the reader never writes);
``stored_groups`` yields the inserted groups as typed records with their insert time and how
many times each was trained on (handed to the learner by a sample that no later rewind undid:
samples the resumed learner lost do not count), optionally only those a ``GroupFilter`` lets
through (weight versions, insert time, task). ``flowrl-async replay RUN_DIR`` prints a summary
per weight version, and can export the groups as JSON lines or insert them into a running
replay service (``--into``); ``replay.preload`` does the latter when a training run starts.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import msgpack

from flowrl_async.records import Group
from flowrl_async.replay.filter import GroupFilter, parse_time, parse_versions
from flowrl_async.replay.log import RecoveryReport, SegmentLog
from flowrl_async.wire import WireError, group_from_wire


def read_log(directory: str | Path, report: RecoveryReport | None = None) -> Iterator[dict]:
    """Every intact record, decoded, with the recovery's skipping rules and no writes."""
    for _, record in read_records(directory, report):
        yield record


def read_records(
    directory: str | Path, report: RecoveryReport | None = None
) -> Iterator[tuple[tuple[int, int], dict]]:
    """``read_log`` with each record's log position (segment index, offset)."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"no replay log at {directory}")
    for position, payload in SegmentLog(directory).read_from(report, truncate=False):
        try:
            yield position, msgpack.unpackb(payload, raw=False)
        except Exception:  # a frame whose CRC holds but whose payload does not decode
            if report is not None:
                report.corrupt_skipped += 1


def trained_counts(records: list[tuple[tuple[int, int], dict]]) -> Counter:
    """How many times each group id was handed to a learner whose update survived: ``smp``
    records count, except those a later ``rwd`` undid (a learner resumed from an older
    checkpoint: the samples logged after the replay checkpoint it names were trained by
    updates that are lost). ``records``: (log position, record), in log order."""
    samples: list[tuple[tuple[int, int], list]] = []
    for position, r in records:
        if r.get("k") == "smp":
            samples.append((position, r["ids"]))
        elif r.get("k") == "rwd":  # the state went back to the log position (s, o)
            covered = (r["s"], r["o"])
            samples = [(p, ids) for p, ids in samples if p < covered]
    return Counter(gid for _, ids in samples for gid in ids)


def stored_groups(
    directory: str | Path, where: GroupFilter | None = None
) -> Iterator[tuple[Group, float, int]]:
    """-> (group, insert time, times trained: handed to the learner by samples that no rewind
    undid), in insert order; only the groups ``where`` keeps."""
    where = where or GroupFilter()
    records = list(read_records(directory))
    sampled = trained_counts(records)
    for _, r in records:
        if r.get("k") != "ins":
            continue
        at = float(r.get("at") or 0.0)
        if not where.keeps_time(at):
            continue  # not even decoded
        try:
            group = group_from_wire(r["g"])
        except WireError:
            continue
        if where.keeps(group):
            yield group, at, sampled[group.group_id]


def insert_into(
    directory: str | Path,
    address: str,
    where: GroupFilter | None = None,
    chunk: int = 256,
    keys: dict | None = None,
) -> dict:
    """Insert the stored groups ``where`` keeps into the replay service at ``address``
    (``keys``: ReplayClient's CURVE arguments), each acknowledged; groups keep their ids, so
    doing it again inserts nothing twice. -> {"groups": read, "new": not already there,
    "max_version": the newest weight version in them (-1: none)}."""
    from flowrl_async.replay.client import ReplayClient

    client = ReplayClient(address, **(keys or {}))
    read = new = 0
    max_version = -1
    try:
        groups = stored_groups(directory, where)
        while batch := [g for g, _, _ in islice(groups, chunk)]:
            read += len(batch)
            new += sum(client.insert_many(batch))
            max_version = max(max_version, *(r.last_version for g in batch for r in g.responses))
    finally:
        client.close()
    return {"groups": read, "new": new, "max_version": max_version}


def summary(directory: str | Path, where: GroupFilter | None = None) -> list[dict]:
    by_version: dict[int, list] = defaultdict(list)
    for group, _, times in stored_groups(directory, where):
        by_version[group.min_version].append((group, times))
    rows = []
    for version in sorted(by_version):
        items = by_version[version]
        responses = [r for g, _ in items for r in g.responses]
        rows.append({
            "version": version,
            "groups": len(items),
            "trained": sum(1 for _, t in items if t > 0),
            "reward": sum(r.reward for r in responses) / len(responses),
            "accuracy": sum(r.info == "ok" for r in responses) / len(responses),
        })  # fmt: skip
    return rows


def export(directory: str | Path, out: Path, where: GroupFilter | None = None) -> int:
    n = 0
    with open(out, "w") as f:
        for group, at, times in stored_groups(directory, where):
            f.write(json.dumps({
                "group_id": group.group_id, "prompt_id": group.prompt_id, "task": group.task,
                "prompt_token_ids": group.prompt_token_ids.tolist(), "inserted_at": at,
                "times_trained": times, "actor_id": group.actor_id, "cursor": group.cursor,
                "responses": [{
                    "token_ids": r.token_ids.tolist(),
                    "behavior_logprobs": r.behavior_logprobs.tolist(), "reward": r.reward,
                    "finish_reason": r.finish_reason, "version": r.first_version, "info": r.info,
                } for r in group.responses],
            }) + "\n")  # fmt: skip
            n += 1
    return n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="flowrl-async replay", description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run directory (its replay/ is read) or a replay directory")
    p.add_argument("--export", default=None, help="write the groups as JSON lines here")
    p.add_argument("--versions", default=None, help="only these weight versions: 3, 3:7, 3:, :7")
    p.add_argument("--since", default=None, help="inserted at or after: unix s or ISO 8601")
    p.add_argument(
        "--until",
        default=None,
        help="inserted at or before: unix s or ISO 8601 (a date alone means its midnight, "
        "so --until 2026-11-29 leaves that day out)",
    )
    p.add_argument("--task", default=None, help="only groups of this task")
    p.add_argument(
        "--into", default=None, help="insert the groups into the replay service at this address"
    )
    p.add_argument("--curve-server-key", default=None, help="with --into: the server's public key")
    p.add_argument("--curve-client-key", default=None, help="with --into: this client's secret key")
    a = p.parse_args(argv)
    try:
        lo, hi = parse_versions(a.versions)
        where = GroupFilter(lo, hi, parse_time(a.since), parse_time(a.until), a.task)
    except ValueError as e:
        p.error(str(e))
    directory = Path(a.run)
    if (directory / "replay").is_dir():
        directory = directory / "replay"
    rows = summary(directory, where)
    print(f"{'version':>7}  {'groups':>6}  {'trained':>7}  {'reward':>6}  {'accuracy':>8}")
    for r in rows:
        print(f"{r['version']:>7}  {r['groups']:>6}  {r['trained']:>7}  {r['reward']:>6.3f}  "
              f"{r['accuracy']:>8.3f}")  # fmt: skip
    if a.export:
        print(f"exported {export(directory, Path(a.export), where)} groups to {a.export}")
    if a.into:
        keys = {}
        if a.curve_server_key:
            keys = {"curve_server_key": a.curve_server_key, "curve_client_key": a.curve_client_key}
        done = insert_into(directory, a.into, where, keys=keys)
        print(f"inserted {done['groups']} groups into {a.into} ({done['new']} new)")
