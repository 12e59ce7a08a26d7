"""The streaming rollout loop: prompts stay in flight, groups leave as they finish, weights
load between engine steps.

    while not stopped:
        load the newest published weights, if any        # in flight: between two steps
        positions = replay.admit(free slots)             # up to max_in_flight prompts
        submit each prompt (n responses) to the engine
        finished = engine.step()                         # one token for every sequence
        replay.insert_many(verified groups of finished)  # as soon as all n are done

Invariants (beside RolloutLoop's):
- a group is pushed once all n of its responses finished, never part of one; a stopped loop
  drops what is in flight (its positions stay outstanding at the service and are handed out
  again when the actor's restart releases them);
- every token records the weight version it was sampled under: a load between two steps
  records, for each response in flight, how many tokens it had (``Response.switches``);
  staleness counts from the oldest token's version. A vLLM engine in a process of its own
  steps on by itself, so there the count is not known: such a response keeps its first
  and last version and no switches (an unrecorded split, counted from the oldest);
- each token's behaviour log-prob is the one the engine computed when it sampled that token,
  so the learner's importance weights are exact whatever the engine's state was:
  - ``inflight_kv="keep"``: the running sequences keep their cached keys and values, so a
    token after a load is sampled from the new weights over the old weights' keys and
    values of the tokens before it: a mixed distribution, neither version's, which is the
    one the recorded log-prob belongs to;
  - ``inflight_kv="recompute"``: the running sequences compute their prompt and tokens so
    far again under the new weights, so every token after the load is sampled from the new
    version's own distribution (teacher forcing under it gives its log-prob), at the cost
    of one prefill per running sequence per load;
- ``inflight_updates=False``: a waiting publication stops admission; it loads once the
  engine has drained, so no response spans two versions (the engine idles meanwhile).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from flowrl_async.actors.config import KV_MODES
from flowrl_async.actors.rollout import RolloutLoop


@dataclass
class InFlight:
    """A prompt in the engine: where it came from, when and under which version it went in,
    and the loads since (version, tokens each response had then)."""

    position: int
    prompt: object
    ids: list[int]
    started: float
    version: int
    loads: list[tuple[int, list[int]]] = field(default_factory=list)


class StreamingLoop(RolloutLoop):
    """Admit as slots free, step the engine, push each group as soon as it is done."""

    def __init__(self, *args, max_in_flight: int = 8, inflight_updates: bool = True,
                 inflight_kv: str = "keep", **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if inflight_kv not in KV_MODES:
            raise ValueError(f"inflight_kv={inflight_kv!r}: expected one of {KV_MODES}")
        self.max_in_flight, self.inflight_kv = max_in_flight, inflight_kv
        self.inflight_updates = inflight_updates
        self.pending: dict[int, InFlight] = {}
        self._keys = itertools.count()
        self.engine_steps = 0
        self.engine_s = 0.0  # time inside engine steps (the busy fraction's numerator)
        self.open_s = 0.0  # time with prompts in flight (its denominator)
        self.load_wait_max = 0  # engine steps run while a waiting publication was not loaded
        # engine step time against running sequences k, as sums (n, Σk, Σk², Σt, Σk·t): what
        # ``flowrl-async simulate calibrate`` fits its step cost to
        self.step_sums = [0, 0, 0, 0.0, 0.0]
        self._waited = None  # steps since a publication was seen waiting (drain mode)
        self._admit_after = 0.0  # monotonic time before which admission is not asked again

    def run(self, max_batches: int | None = None) -> None:
        try:
            super().run(max_batches)
        finally:
            self.stop_streaming()  # what is in flight goes; its positions stay outstanding

    def run_once(self) -> int:
        """New weights, fill free slots, one engine step, push what finished; -> 1 if a
        group went."""
        t0 = time.perf_counter()
        draining = self.update_weights()
        if not draining:
            self.fill()
        if not self.pending:
            self.stats.admission_waits += 1
            time.sleep(self.idle_sleep_s)
            return 0
        t1 = time.perf_counter()
        with self.engine_lock:
            before = self.generator.stepped_tokens
            finished = self.generator.step()
            k = self.generator.stepped_tokens - before  # one token per running sequence
        t2 = time.perf_counter()
        self.count_step(k, t2 - t1)
        self.engine_s += t2 - t1
        self.stats.generate_s += t2 - t1
        self.engine_steps += 1
        if self._waited is not None:
            self._waited += 1
        groups = [self.finish(key, completions) for key, completions in finished]
        if groups:
            self._admit_after = 0.0  # slots freed: ask again at once
            t3 = time.perf_counter()
            self.push(groups)
            self.stats.push_s += time.perf_counter() - t3
            self.stats.groups += len(groups)
        self.open_s += time.perf_counter() - t0
        return 1 if groups else 0

    def count_step(self, k: int, seconds: float) -> None:
        s = self.step_sums
        s[0], s[1], s[2] = s[0] + 1, s[1] + k, s[2] + k * k
        s[3], s[4] = s[3] + seconds, s[4] + k * seconds

    def update_weights(self) -> bool:
        """Load a waiting publication: at once (in flight), or once the engine has drained;
        -> whether admission must wait for that drain."""
        if self.inflight_updates or not self.pending:
            waited, self._waited = self._waited or 0, None  # a failed take ends the drain too
            if self.maybe_load_weights():
                self.load_wait_max = max(self.load_wait_max, waited)
            return False
        if self.receiver is None or not has_waiting(self.receiver):
            self._waited = None  # the link broke or was re-formed: nothing to wait for
        elif self._waited is None:
            self._waited = 0
        return self._waited is not None

    def loaded(self, version: int) -> None:
        """New weights are in the engine: note how far each response in flight had got, and
        with ``recompute`` drop their keys and values."""
        progress = self.generator.progress()  # None: not known (an engine process)
        for key, job in self.pending.items():
            job.loads.append((version, None if progress is None else progress.get(key)))
        if self.inflight_kv == "recompute":
            self.generator.recompute_in_flight()

    def finish(self, key, completions):
        job = self.pending.pop(key)
        return self.build_group(job.position, job.prompt, job.ids, completions, job.started,
                                job.version, job.loads)  # fmt: skip

    def fill(self) -> None:
        """Ask admission for the free slots; after a refusal, not again before a group
        finishes or ``idle_sleep_s`` passes (one request per engine step would be waste)."""
        free = self.max_in_flight - len(self.pending)
        if free <= 0 or (self.pending and time.monotonic() < self._admit_after):
            return
        positions = self.replay.admit(self.actor_id, free, weights=self.version)
        if not positions:
            self._admit_after = time.monotonic() + self.idle_sleep_s
        for position in positions:
            prompt = self.prompts.at(position)
            ids = self.tokenizer(prompt.text)["input_ids"]
            key = next(self._keys)
            with self.engine_lock:
                self.generator.submit(key, ids, self.spec)
            self.pending[key] = InFlight(position, prompt, ids, time.time(), self.version)

    def stop_streaming(self) -> None:
        """Drop what is in flight (nothing half-generated reaches the buffer)."""
        with self.engine_lock:
            self.generator.abort_all()
        self.pending.clear()


def has_waiting(receiver) -> bool:
    """Whether ``receiver`` holds a publication not yet taken (False if it cannot tell)."""
    waiting = getattr(receiver, "waiting", None)
    return bool(waiting()) if waiting is not None else False
