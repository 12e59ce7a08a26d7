"""A discrete-event simulation of a run: N actors, the replay service, L learner ranks.

Simulated time only; the replay service is the real one's state machine (``ReplayState``,
its buffer, selectors and rate limiter) decided by the real decision functions
(``replay.decisions``), so admission, staleness eviction and selection are the service's
own for the same events. What costs time comes from ``Costs``.

    actor (streaming):  load a waiting publication (in flight, or once drained)
                        admit into free slots → prefill → engine steps until a group ends
                        (steps cost step(k) for k running sequences; a publication that
                        becomes available mid-way is loaded at the next step boundary)
                        → verify and insert the finished groups
    actor (batch):      admit groups_per_batch → all steps until the slowest response ends
                        → verify and insert → load a waiting publication
    learner:            sample B groups at its version (wait for inserts when refused)
                        → train(tokens / L) → every publish_every steps: version + 1,
                        publish (available to actors when the broadcast ends)
    sync mode:          each step, every actor generates its share in batches, then the
                        learner trains and publishes: nothing overlaps

Invariants: entities act in time order (one heap); an entity's work ends before its effects
(inserts, a version) are visible; a group's staleness counts from the version its prompt
was admitted under (the oldest of its tokens), as in the real loop.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
from dataclasses import dataclass, field

from flowrl_async.replay import decisions
from flowrl_async.replay.config import ServerConfig
from flowrl_async.run.sim.costs import Costs
from flowrl_async.wire import GroupInfo

NEVER = math.inf


@dataclass
class Shape:
    """What the run's config says about its processes (the parts that cost time)."""

    actors: int = 2
    ranks: int = 1
    n: int = 8
    batch_groups: int = 4
    publish_every: int = 1
    streaming: bool = True
    max_in_flight: int = 8
    groups_per_batch: int = 4
    inflight_updates: bool = True
    inflight_kv: str = "keep"
    sync: bool = False
    sync_batches: int = 1  # sync: batches each actor generates per step


@dataclass
class SimGroup:
    gid: str
    cursor: int
    version: int  # the actor's weights when its prompt was admitted
    lengths: list[int]  # each response's length
    start: int = 0  # the actor's engine step when it entered the engine

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


class Replay:
    """The real service state driven by simulated events."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.state = decisions.new_state(cfg)
        self.starved = False
        self.tokens: dict[str, int] = {}
        self._req = itertools.count()

    def admit(self, actor: int, k: int, weights: int) -> list[int]:
        positions = decisions.admit(self.state, self.cfg, k, weights, self.cfg.max_admit)
        if positions:
            self.state.apply({"k": "adm", "a": actor, "p": positions})
        return positions

    def may_insert(self) -> bool:
        return decisions.may_insert(self.state, self.starved)

    def insert(self, actor: int, g: SimGroup, now: float, spread: float = 0.0) -> None:
        """``spread``: the group's reward spread (the prioritized selector's weight)."""
        info = GroupInfo(g.gid, actor, g.cursor, g.version, spread)
        self.state.apply({"k": "ins", "g": None, "at": now}, info=info, group_bytes=b"")
        self.tokens[g.gid] = g.tokens

    def sample(self, batch: int, version: int) -> list[tuple[str, int]] | None:
        """-> (group id, staleness) of the groups taken, or None (as the server decides)."""
        self.set_version(version)
        ids, starved = decisions.select(self.state, batch)
        if starved is not None:
            self.starved = starved
        if ids is None:
            return None
        req = f"r{next(self._req)}"
        self.state.apply({"k": "smp", "ids": ids, "v": self.state.buffer.version, "req": req})
        info = self.state.answers[req][1]  # [times_sampled, staleness, inserted_at] each
        return [(gid, row[1]) for gid, row in zip(ids, info, strict=True)]

    def set_version(self, version: int) -> None:
        if version > self.state.buffer.version:
            self.state.apply({"k": "ver", "v": version})


@dataclass
class Outcome:
    """What a simulated run did."""

    steps: int = 0
    time_s: float = 0.0
    learner_wait_s: float = 0.0
    learner_publish_s: float = 0.0
    actor_engine_s: list = field(default_factory=list)
    actor_tokens: list = field(default_factory=list)
    staleness: list = field(default_factory=list)  # per trained group
    rows: list = field(default_factory=list)  # per learner step, metrics.jsonl-like
    occupancy: list = field(default_factory=list)  # (time, groups held) at each step
    evicted_stale: int = 0
    loads: int = 0

    def summary(self, actors: int) -> dict:
        t = max(self.time_s, 1e-12)
        hist: dict[int, int] = {}
        for s in self.staleness:
            hist[s] = hist.get(s, 0) + 1
        return {
            "steps": self.steps, "time_s": self.time_s, "steps_per_s": self.steps / t,
            "learner_idle": self.learner_wait_s / t,
            "actor_idle": 1 - sum(self.actor_engine_s) / (actors * t) if actors else 0.0,
            "staleness_mean": sum(self.staleness) / max(1, len(self.staleness)),
            "staleness_hist": dict(sorted(hist.items())),
            "evicted_stale": self.evicted_stale, "tokens_per_s": sum(self.actor_tokens) / t,
            "loads": self.loads,
        }  # fmt: skip


class Simulation:
    """One simulated run: ``run(steps)`` -> Outcome."""

    def __init__(self, shape: Shape, costs: Costs, replay_cfg: ServerConfig, seed: int = 0):
        self.shape, self.costs = shape, costs
        self.replay = Replay(replay_cfg)
        self.rng = random.Random(seed)
        self.publications: list[tuple[float, int]] = []  # (available at, version)
        self.published_at: list[float] = []
        self.out = Outcome()
        self.actors = [Actor(self, i + 1) for i in range(shape.actors)]
        self.learner = Learner(self)
        self._heap: list = []
        self._seq = itertools.count()
        self.waiting: dict = {}  # insertion-ordered: the same seed wakes in the same order
        self.now = 0.0

    def new_group(self, cursor: int, version: int) -> SimGroup:
        lengths = [self.costs.draw_length(self.rng) for _ in range(self.shape.n)]
        return SimGroup(f"g{cursor}-{next(self._seq)}", cursor, version, lengths)

    def newest(self, now: float, above: int) -> int | None:
        """The newest version available at ``now`` above ``above``, or None (publications
        come in time order with rising versions)."""
        i = bisect.bisect_right(self.published_at, now)
        return self.publications[i - 1][1] if i and self.publications[i - 1][1] > above else None

    def next_publication(self, now: float) -> float:
        i = bisect.bisect_right(self.published_at, now)
        return self.published_at[i] if i < len(self.published_at) else NEVER

    def publish(self, at: float, version: int) -> None:
        """A publication available at ``at``: actors in the middle of a run of engine steps
        then stop at the first step boundary after it."""
        self.publications.append((at, version))
        self.published_at.append(at)
        self.schedule(at, Wake())
        for actor in self.actors:
            end = actor.cut(at)
            if end is not None:
                self.schedule(end, actor)

    def schedule(self, at: float, who) -> None:
        """``who`` acts at ``at``; an actor's earlier entry is void (its epoch moved on)."""
        epoch = getattr(who, "epoch", 0) + 1
        if hasattr(who, "epoch"):
            who.epoch = epoch
        heapq.heappush(self._heap, (at, next(self._seq), who, epoch))

    def wake(self, at: float, kind: type) -> None:
        for who in [w for w in self.waiting if isinstance(w, kind)]:
            del self.waiting[who]
            self.schedule(at, who)

    def run(self, steps: int) -> Outcome:
        if self.shape.sync:
            return self.run_sync(steps)
        for who in [*self.actors, self.learner]:
            self.schedule(0.0, who)
        while self._heap and self.learner.step < steps:
            self.event()
        # the actors go on until the last step (and its publication) ends: the shares and
        # token counts cover the same span as the learner's
        while self._heap and self._heap[0][0] <= self.learner.done_at:
            self.event(learner=False)
        for actor in self.actors:
            actor.book_until(self.learner.done_at)
        return self.finish()

    def event(self, learner: bool = True) -> None:
        """The next event (``learner=False``: the learner's are dropped)."""
        self.now, _, who, epoch = heapq.heappop(self._heap)
        if getattr(who, "epoch", epoch) != epoch or (not learner and isinstance(who, Learner)):
            return  # rescheduled since, or past the end
        if isinstance(who, Wake):
            if who.version is not None:  # the learner tells the service, then broadcasts
                self.replay.set_version(who.version)
            self.wake(self.now, Actor)
            return
        at = who.act(self.now)
        if at is None:
            self.waiting[who] = None
        else:
            self.schedule(at, who)

    def finish(self) -> Outcome:
        out = self.out
        out.steps = self.learner.step
        out.time_s = self.learner.done_at
        out.actor_engine_s = [a.engine_s for a in self.actors]
        out.actor_tokens = [a.tokens for a in self.actors]
        out.evicted_stale = self.replay.state.buffer.counters.evicted_stale
        out.loads = sum(a.loads for a in self.actors)
        return out

    def run_sync(self, steps: int) -> Outcome:
        """Lock-step: all actors generate this step's groups in batches, then train, then
        publish; nothing overlaps."""
        now = 0.0
        for _ in range(steps):
            gen = 0.0
            for actor in self.actors:
                took = 0.0
                if actor.version < self.learner.version:  # this step's weights first
                    took += actor.load(self.learner.version)
                for _ in range(self.shape.sync_batches):
                    took += actor.generate_batch(now + took) or 0.0
                gen = max(gen, took)
            now += gen
            self.learner.train_step(now, waited=gen)
            now = self.learner.done_at
        return self.finish()


class Wake:
    """Actors waiting for work try again: a publication became available, or (``version``)
    the service heard of a new version."""

    def __init__(self, version: int | None = None):
        self.version = version


class Actor:
    """One rollout actor: streaming or batch, as the shape says. Streaming keeps each
    running sequence as the engine step at which it ends (a heap), so a jump to the next
    end costs O(log k), not O(k)."""

    def __init__(self, sim: Simulation, actor_id: int):
        self.sim, self.id = sim, actor_id
        self.version = 0
        self.groups: dict[str, SimGroup] = {}
        self.left: dict[str, int] = {}  # responses of each group still running
        self.ends: list[tuple[int, str]] = []  # (engine step it ends at, group id)
        self.steps = 0  # engine steps done
        self.run: list | None = None  # [start, step time, steps] planned, not yet booked
        self.epoch = 0  # its heap entry's (a cut reschedules it)
        self.finished: list[SimGroup] = []
        self.engine_s, self.tokens, self.loads = 0.0, 0, 0

    def act(self, now: float) -> float | None:
        sim, shape, costs = self.sim, self.sim.shape, self.sim.costs
        done = self.commit()
        if done:  # verify what ended, then go on
            self.finished += done
            return now + costs.verify_s * len(done)
        self.push(now)
        if self.finished:  # the rate limiter holds its inserts: the actor waits
            return None
        spent = 0.0
        newest = sim.newest(now, self.version)
        if newest is not None and (
            shape.inflight_updates or not self.groups or not shape.streaming
        ):
            spent += self.load(newest)
        if not shape.streaming:
            return self.batch(now, spent)
        draining = newest is not None and not shape.inflight_updates and bool(self.groups)
        if not draining:
            spent += self.fill(shape.max_in_flight - len(self.groups))
        if not self.ends:
            return None if spent == 0 else now + spent
        step = costs.step(len(self.ends))
        s = self.ends[0][0] - self.steps
        upcoming = sim.next_publication(now)
        if upcoming < NEVER and step > 0:  # seen at the first step boundary after it
            s = max(1, min(s, math.ceil((upcoming - now - spent) / step)))
        self.run = [now + spent, step, s]  # committed when the actor next acts
        return now + spent + s * step

    def commit(self) -> list[SimGroup]:
        """Book the run of engine steps planned at the last act (as ``cut`` left it); ->
        the groups it ended."""
        if self.run is None:
            return []
        _, step, s = self.run
        self.run = None
        k = len(self.ends)
        self.steps += s
        self.tokens += s * k
        self.engine_s += s * step
        done = []
        while self.ends and self.ends[0][0] <= self.steps:
            _, gid = heapq.heappop(self.ends)
            self.left[gid] -= 1
            if self.left[gid] == 0:
                del self.left[gid]
                done.append(self.groups.pop(gid))
        return done

    def book_until(self, end: float) -> None:
        """At the end of the simulation: book the engine steps of a planned run done by
        ``end``."""
        if self.run is not None:
            start, step, s = self.run
            if step > 0:
                self.run[2] = min(s, max(0, math.floor((end - start) / step)))
            self.commit()

    def cut(self, at: float) -> float | None:
        """A publication at ``at``: end the planned run at the first step boundary after it;
        -> the new end, or None when the run ends by then anyway."""
        if self.run is None:
            return None
        start, step, s = self.run
        if step <= 0 or at >= start + s * step:
            return None
        steps = max(1, math.ceil((at - start) / step))
        if steps >= s:
            return None
        self.run[2] = steps
        return start + steps * step

    def load(self, version: int) -> float:
        """Load ``version``; -> its cost (recompute: the running sequences' prefill too)."""
        costs, shape = self.sim.costs, self.sim.shape
        self.version, self.loads = version, self.loads + 1
        extra = 0.0
        if shape.inflight_kv == "recompute":  # prompt and tokens so far, again
            for _, gid in self.ends:  # each running response has run since its group came
                extra += costs.prefill_per_token_s * (costs.prompt_tokens + self.steps
                                                      - self.groups[gid].start)  # fmt: skip
        return costs.load_s + extra

    def fill(self, free: int) -> float:
        if free <= 0:
            return 0.0
        positions = self.sim.replay.admit(self.id, free, self.version)
        for p in positions:
            g = self.sim.new_group(p, self.version)
            g.start = self.steps
            self.groups[g.gid] = g
            self.left[g.gid] = len(g.lengths)
            for length in g.lengths:
                heapq.heappush(self.ends, (self.steps + length, g.gid))
        return self.sim.costs.prefill_per_token_s * self.sim.costs.prompt_tokens * len(positions)

    def push(self, now: float) -> None:
        """Insert the groups that finished (the replay's rate limiter may hold them)."""
        replay = self.sim.replay
        while self.finished and replay.may_insert():
            limiter = replay.state.limiter
            past = limiter is not None and not limiter.can_insert(len(replay.state.buffer))
            replay.insert(self.id, self.finished.pop(0), now)
            self.sim.wake(now, Learner)
            if past:  # let in because a sample starved: one, then the sample tries again
                replay.starved = False
                break

    def batch(self, now: float, spent: float) -> float | None:
        """Batch mode: one batch from admission to its slowest response (after ``spent``
        seconds of loading)."""
        took = self.generate_batch(now + spent)
        if took is None:
            return None if spent == 0 else now + spent
        return now + spent + took

    def generate_batch(self, now: float) -> float | None:
        """Admit a batch and generate it to the end; -> seconds, or None if refused."""
        shape, costs = self.sim.shape, self.sim.costs
        positions = self.sim.replay.admit(self.id, shape.groups_per_batch, self.version)
        if not positions:
            return None
        groups = [self.sim.new_group(p, self.version) for p in positions]
        lengths = sorted(r for g in groups for r in g.lengths)
        steps_s, done_until = 0.0, 0
        for i, length in enumerate(lengths):  # k sequences run until the shortest ends
            steps_s += (length - done_until) * costs.step(len(lengths) - i)
            done_until = length
        self.engine_s += steps_s
        self.tokens += sum(lengths)
        took = steps_s + costs.prefill_per_token_s * costs.prompt_tokens * len(groups)
        self.finished += groups
        if self.sim.shape.sync:
            self.push(now)
        return took + costs.verify_s * len(groups)


class Learner:
    """L learner ranks as one: sample, train, publish."""

    def __init__(self, sim: Simulation):
        self.sim = sim
        self.step, self.version = 0, 0
        self.done_at, self.waiting_since = 0.0, None

    def act(self, now: float) -> float | None:
        sim = self.sim
        got = sim.replay.sample(sim.shape.batch_groups, self.version)
        if got is None:
            if self.waiting_since is None:
                self.waiting_since = now
            if sim.replay.starved:  # the limiter allows it, the groups are missing: held
                sim.wake(now, Actor)  # inserts may go now
            return None
        waited = 0.0 if self.waiting_since is None else now - self.waiting_since
        self.waiting_since = None
        sim.wake(now, Actor)  # held inserts may go now
        return self.train(now, got, waited)

    def train_step(self, now: float, waited: float) -> None:
        got = self.sim.replay.sample(self.sim.shape.batch_groups, self.version)
        if got is None:
            raise RuntimeError("sync: the step's groups were not all generated")
        self.train(now, got, waited)

    def train(self, now: float, got: list, waited: float) -> float:
        sim, costs = self.sim, self.sim.costs
        tokens = sum(sim.replay.tokens[gid] for gid, _ in got)
        end = now + costs.train(tokens, sim.shape.ranks)
        self.step += 1
        publish = 0.0
        if self.step % sim.shape.publish_every == 0:
            self.version += 1
            publish = costs.publish_s
            if sim.shape.sync:
                sim.replay.set_version(self.version)
            else:  # as the real learner: the service hears of it as the broadcast starts
                sim.schedule(end, Wake(self.version))
            sim.publish(end + publish, self.version)
        started = self.done_at
        self.done_at = end + publish
        out = sim.out
        out.learner_wait_s += waited
        out.learner_publish_s += publish
        stale = [s for _, s in got]
        out.staleness += stale
        out.occupancy.append((now, len(sim.replay.state.buffer)))
        out.rows.append({"step": self.step, "version": self.version, "time_s": self.done_at,
                         "step_s": self.done_at - started, "wait_s": waited,
                         "tokens": float(tokens), "staleness_mean": sum(stale) / len(stale),
                         "staleness_max": max(stale), "replay_size": len(sim.replay.state.buffer)})  # fmt: skip
        return self.done_at
