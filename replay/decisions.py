"""The replay service's decisions as pure functions of its state, shared by the server and
by the simulator (``flowrl_async.run.sim``), so both decide alike for the same events.

The state changes only through ``ReplayState.apply`` (records); these functions read it and
say what the server then records: which prompt positions an admission grants, which groups
a sample takes, whether an insert may go ahead of the rate limiter.
"""

from __future__ import annotations

from flowrl_async.replay.buffer import ReplayBuffer
from flowrl_async.replay.config import ServerConfig
from flowrl_async.replay.state import ReplayState


def new_state(cfg: ServerConfig, limits=None) -> ReplayState:
    """An empty state with the buffer, selector and rate limiter ``cfg`` describes."""
    buffer = ReplayBuffer(cfg.capacity, cfg.max_staleness, cfg.selector, cfg.max_times_sampled,
                          cfg.seed, cfg.fresh_fraction)  # fmt: skip
    buffer.capacity_bytes = cfg.capacity_bytes
    buffer.admission_lead = cfg.admission_lead
    buffer.priority_half_life = cfg.priority_half_life
    if limits is None:
        return ReplayState(buffer, cfg.rate_limiter())
    return ReplayState(buffer, cfg.rate_limiter(), limits)


def admission_version(state: ReplayState, cfg: ServerConfig, weights: int | None) -> int:
    """The version admission counts from: with ``admission="weights"`` (the default) and a
    staleness bound, the actor's weights when older than the learner's; else the learner's.
    A group made with weights w is trained only up to version w + bound, and the learner
    takes groups_per_version per version, so counting from w admits only what can be
    trained in time: no generation is thrown away as stale, but nothing fresher is left to
    pick either (see ServerConfig.admission)."""
    version = state.buffer.version
    if cfg.admission != "weights" or weights is None or state.buffer.max_staleness is None:
        return version
    return min(version, weights)


def dead_on_arrival(state: ReplayState, weights: int) -> bool:
    """Whether groups made with ``weights`` would be stale on arrival."""
    bound = state.buffer.max_staleness
    return bound is not None and weights < state.buffer.version - bound


def admit(state: ReplayState, cfg: ServerConfig, k: int, weights: int | None,
          most: int) -> list[int]:  # fmt: skip
    """The prompt positions an admission of ``k`` grants (``most``: a reply's limit):
    restarted actors' positions first, then new ones from the cursor."""
    free = state.buffer.admission_capacity(
        admission_version(state, cfg, weights), cfg.groups_per_version, state.in_flight
    )
    if weights is not None and dead_on_arrival(state, weights):
        free = 0  # this actor's weights are too old: its groups would be evicted
    n = max(0, min(k, free, most))
    redo = state.redo[:n]
    return redo + list(range(state.cursor, state.cursor + n - len(redo)))


def select(state: ReplayState, batch_size: int) -> tuple[list[str] | None, bool | None]:
    """The groups a sample of ``batch_size`` takes now, or None; and, when the limiter
    allowed it, whether too few groups were eligible (starved: inserts must then go ahead;
    None: the limiter refused, which says nothing about that)."""
    limiter = state.limiter
    if limiter is not None and not limiter.can_sample(batch_size, len(state.buffer)):
        return None, None
    ids = state.buffer.select(batch_size)
    return ids, ids is None


def may_insert(state: ReplayState, starved: bool) -> bool:
    """The limiter allows an insert, or a sample it allows found too few eligible groups
    (holding inserts then would hold both sides forever)."""
    limiter = state.limiter
    return limiter is None or starved or limiter.can_insert(len(state.buffer))
