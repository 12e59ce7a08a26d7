"""The streaming rollout loop: prompts stay in flight, groups leave as they finish, weights
load between engine steps.

    while not stopped:
        load the newest published weights, if any        # in flight: between two steps
        positions = replay.admit(free slots)             # up to max_in_flight prompts
        submit each prompt (n responses) to the engine
        finished = engine.step()                         # one token for every sequence
        replay.insert_many(verified groups of finished)  # as soon as all n are done

Invariants (beside RolloutLoop's): a group is pushed once all n of its responses finished,
never part of one; a response's tokens may span weight versions: ``first_version`` is the
version when its prompt was submitted (staleness counts from it) and ``last_version`` the
version when it finished; each token's behaviour log-prob is the one the engine computed
when it sampled that token, under the weights of that moment, with the keys and values of
earlier tokens as they were computed (the cache of running sequences is kept across a
load), so the recorded log-probs are those of the distribution actually sampled and the
learner's importance weights stay exact; a stopped loop drops what is in flight (its
positions stay outstanding at the service and are handed out again when the actor's
restart releases them).
"""

from __future__ import annotations

import itertools
import time

from flowrl_async.actors.rollout import RolloutLoop


class StreamingLoop(RolloutLoop):
    """Admit as slots free, step the engine, push each group as soon as it is done."""

    def __init__(self, *args, max_in_flight: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.max_in_flight = max_in_flight
        self.pending: dict[int, tuple] = {}  # key -> (position, prompt, ids, started, version)
        self._keys = itertools.count()
        self.engine_steps = 0
        self.engine_s = 0.0  # time inside engine steps (the busy fraction's numerator)
        self._admit_after = 0.0  # monotonic time before which admission is not asked again

    def run(self, max_batches: int | None = None) -> None:
        try:
            super().run(max_batches)
        finally:
            self.stop_streaming()  # what is in flight goes; its positions stay outstanding

    def run_once(self) -> int:
        """Fill free slots, one engine step, push what finished; -> 1 if a group went."""
        self.maybe_load_weights()
        self.fill()
        if not self.pending:
            self.stats.admission_waits += 1
            time.sleep(self.idle_sleep_s)
            return 0
        t0 = time.perf_counter()
        with self.engine_lock:
            finished = self.generator.step()
        elapsed = time.perf_counter() - t0
        self.engine_s += elapsed
        self.stats.generate_s += elapsed
        self.engine_steps += 1
        groups = []
        if finished:
            self._admit_after = 0.0  # slots freed: ask again at once
        for key, completions in finished:
            position, prompt, ids, started, version = self.pending.pop(key)
            groups.append(self.build_group(position, prompt, ids, completions, started, version))
        if not groups:
            return 0
        t1 = time.perf_counter()
        self.push(groups)
        self.stats.push_s += time.perf_counter() - t1
        self.stats.groups += len(groups)
        return 1

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
            self.pending[key] = (position, prompt, ids, time.time(), self.version)

    def stop_streaming(self) -> None:
        """Drop what is in flight (nothing half-generated reaches the buffer)."""
        with self.engine_lock:
            self.generator.abort_all()
        self.pending.clear()
