"""The replay service's protocol: every request, the reply it gets, and what each means.
Messages are ``flowrl_async.wire`` maps over a ROUTER socket; every request carries ``rid``
and its reply echoes it; anything malformed gets ``error {reason}`` (counted in
``rejected``; nothing else changes).

  insert {group, timeout_ms?}       -> ack {group_id, duplicate}      (after the log append;
                                       held while the rate limiter says wait, at most
                                       timeout_ms, then error {reason, code: insert_timeout})
  insert_batch {groups, timeout_ms?} -> acks {results}   (``groups``: a list of msgpack
                                       bytes, one group each (``wire.pack_group``);
                                       ``results``: one [status, reason] per group, in order:
                                       accepted | duplicate | rejected (malformed: reason,
                                       counted in ``rejected``) | timeout (held by the rate
                                       limiter past timeout_ms; resending is safe). Sent once
                                       every group's outcome is known and every accepted
                                       group is in the log: the accepted ones of a message
                                       are appended together, one flush and fsync policy)
  version {version}                 -> version {version}   (the learner's, after a publication)
  admit  {actor, k, version?, weights?} -> admitted {n, positions}  (0 when the actor's
                                       weight version is already beyond the staleness bound;
                                       n <= max_groups)
  release {actor}                   -> released {}
  sample {batch_size, version, timeout_ms, req} -> batch {groups, info} | empty {}  (held
                                       until enough groups and the rate limiter allow, or
                                       the timeout; batch_size <= max_groups; a retry (same
                                       ``req``) of one of the last ``ANSWERS_KEPT`` answered
                                       gets the same batch, after a restart too: ``req`` is
                                       in the ``smp`` record)
  checkpoint {tag?}                 -> checkpointed {path, segment, offset}
  prune  {keep}                     -> pruned {deleted, more?}   (delete every checkpoint
                                       but the newest and those named in ``keep``: file
                                       names; ``more``: deleted beyond the names listed)
  rewind {checkpoint}               -> rewound {checkpoint, version, size}  (the learner
                                       resumed from the state of that replay checkpoint,
                                       named by its file in ``<dir>/checkpoints``: sampling
                                       state back to it, every group and prompt position
                                       since kept)
  stats  {}                         -> stats {...}   (every map in it has a bounded key set:
                                       replay/metrics.py)

Rule: every reply fits the limits the clients decode with (``wire.MAX_MAP_LEN``, lists of
at most ``wire.max_array_len``, strings under ``wire.MAX_STR_LEN``), whatever the data.
"""

REPLIES = {
    "insert": "ack",
    "insert_batch": "acks",
    "admit": "admitted",
    "version": "version",
    "release": "released",
    "sample": "batch",  # or "empty"
    "checkpoint": "checkpointed",
    "prune": "pruned",
    "rewind": "rewound",
    "stats": "stats",
}
REQUESTS = tuple(REPLIES)
