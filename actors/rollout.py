"""The rollout loop: admission → generate → verify → push → newer weights, without pause.

    while not stopped:
        load the newest published weights, if any (and prove them with the probe)
        positions = replay.admit(k)                  # bounded staleness, work dispatch
        prompts   = task prompts at those positions
        responses = generator.generate(prompts, n per prompt)
        rewards   = task.verify(each response)
        replay.insert_many(groups)                   # pipelined, retried until acknowledged

Invariants: every response records the weight version that generated it (weights change
only between batches, so first == last version); behaviour log-probs are the generator's,
at the sampling temperature; a verifier error becomes a reward with a reason, never an
exception; a weight load that fails its probe raises (it is a bug, not noise).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from flowrl_async.actors.generator import Generator, SampleSpec, check_probe
from flowrl_async.actors.weight_receiver import WeightLinkError
from flowrl_async.records import Group, Response, SamplingParams, new_group_id
from flowrl_async.replay.client import InsertTimeout
from flowrl_async.tasks import PromptSource
from flowrl_async.weights import probe_tolerance


@dataclass
class ActorStats:
    """What one actor has done: batches, groups, tokens, weight loads."""

    groups: int = 0
    tokens: int = 0
    generate_s: float = 0.0
    verify_s: float = 0.0
    push_s: float = 0.0
    admission_waits: int = 0
    weight_loads: int = 0
    load_s: float = 0.0
    weight_link_errors: int = 0
    insert_retries: int = 0
    rewards: Counter = field(default_factory=Counter)


MAX_SWITCHES = 256  # version changes a response records (more: an unrecorded split)


def token_switches(first: int, loads: list[tuple[int, int | None]], length: int):
    """A response's versions from the loads while it was in flight, (version, tokens it had
    then) oldest first: -> (version of its first token, its switches as Response keeps
    them, version of its last token). A load before its first token moves its first
    version; one after its last token (it had finished, its group had not) leaves no trace,
    and so does one of a version not above the last one (the same weights again).
    A load before its first token is a switch at 0: every token is the new version's, but
    the prompt's keys and values may be the old weights' (a prefix cache, a chunked prefill),
    so the first version, from which staleness counts, stays. A load whose count is not
    known (None), or more than MAX_SWITCHES loads, leave the split unrecorded: no switches,
    the last version that of the last load (staleness then counts from the first)."""
    last = max(first, *(v for v, _ in loads)) if loads else first
    if any(had is None for _, had in loads):
        return first, (), last
    switches: list[int] = []
    for version, had in loads:
        if version <= (switches[-1] if switches else first) or had >= length:
            continue  # the same weights again (a re-formed group), or after its last token
        if switches and switches[-2] == had:  # two loads between the same two tokens
            switches[-1] = version
        else:
            switches += [had, version]
    if len(switches) > 2 * MAX_SWITCHES:  # a message must stay within the decoder's limits
        return first, (), switches[-1]
    return first, tuple(switches), switches[-1] if switches else first


class RolloutLoop:
    """Admit, generate, verify, insert; load newer weights between batches."""

    def __init__(
        self,
        actor_id: int,
        generator: Generator,
        prompts: PromptSource,
        tokenizer,
        replay,
        spec: SampleSpec,
        groups_per_batch: int = 4,
        receiver=None,
        probe_tolerance: float = 1e-3,
        version: int = 0,
        idle_sleep_s: float = 0.05,
        dtype: str = "float32",
    ):
        self.actor_id, self.generator, self.prompts = actor_id, generator, prompts
        self.tokenizer, self.replay, self.spec = tokenizer, replay, spec
        self.groups_per_batch, self.receiver = groups_per_batch, receiver
        self.dtype = dtype  # the engine's: the probe's tolerance allows for its rounding
        self.probe_tolerance, self.version, self.idle_sleep_s = (
            probe_tolerance,
            version,
            idle_sleep_s,
        )
        self.stats = ActorStats()
        self.stopped = False
        self.engine_lock = threading.Lock()

    def run(self, max_batches: int | None = None) -> None:
        done = 0
        while not self.stopped and (max_batches is None or done < max_batches):
            done += self.run_once()

    def run_once(self) -> int:
        """One batch; -> 1 if it generated, 0 if admission said wait."""
        self.maybe_load_weights()
        positions = self.replay.admit(self.actor_id, self.groups_per_batch, weights=self.version)
        if not positions:
            self.stats.admission_waits += 1
            time.sleep(self.idle_sleep_s)
            return 0
        items = [(pos, self.prompts.at(pos)) for pos in positions]
        token_ids = [self.tokenizer(p.text)["input_ids"] for _, p in items]
        started = time.time()
        with self.engine_lock:  # evaluation may share the engine from another thread
            completions = self.generator.generate(token_ids, self.spec)
        self.stats.generate_s += time.time() - started
        groups = [
            self.build_group(pos, prompt, ids, completions_of_prompt, started)
            for (pos, prompt), ids, completions_of_prompt in zip(
                items, token_ids, completions, strict=True
            )
        ]
        t0 = time.perf_counter()
        self.push(groups)
        self.stats.push_s += time.perf_counter() - t0
        self.stats.groups += len(groups)
        return 1

    def push(self, groups: list[Group]) -> None:
        """Insert all until acknowledged (pipelined). A rate-limiter timeout is answered by
        trying again (the service deduplicates by group id, so the effect is exactly once)."""
        while True:
            try:
                self.replay.insert_many(groups)
                return
            except InsertTimeout:
                if self.stopped:
                    raise
                self.stats.insert_retries += 1

    def build_group(self, position, prompt, prompt_ids, completions, started,
                    first_version: int | None = None, loads=()) -> Group:  # fmt: skip
        """``first_version``: the weights its first tokens came from (streaming: the version
        when it was submitted); ``loads``: (version, tokens each response had then) of every
        load while it was in flight (streaming), oldest first."""
        t0 = time.perf_counter()
        responses = []
        for i, c in enumerate(completions):
            text = self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
            verdict = self.prompts.verify(prompt, text)
            first = self.version if first_version is None else first_version
            first, switches, last = token_switches(
                first, [(v, None if had is None else had[i]) for v, had in loads], len(c.token_ids)
            )
            responses.append(
                Response(
                    token_ids=c.token_ids,
                    behavior_logprobs=c.logprobs,
                    reward=float(verdict.reward),
                    finish_reason=c.finish_reason,
                    first_version=first,
                    last_version=last,
                    info=verdict.info,
                    switches=switches,
                )
            )
            self.stats.rewards[verdict.info] += 1
            self.stats.tokens += len(c.token_ids)
        self.stats.verify_s += time.perf_counter() - t0
        s = self.spec
        return Group(
            group_id=new_group_id(),
            prompt_id=prompt.prompt_id,
            prompt_token_ids=np.asarray(prompt_ids, dtype=np.int32),
            task=self.prompts.task_name,
            responses=tuple(responses),
            actor_id=self.actor_id,
            sampling=SamplingParams(s.temperature, s.top_p, s.max_tokens, s.n),
            cursor=position,
            created_at=started,
            finished_at=time.time(),
        )

    def loaded(self, version: int) -> None:
        """Called once new weights are in the engine, before the probe runs."""

    def maybe_load_weights(self) -> bool:
        receiver = self.receiver
        if receiver is None:
            return False
        t0 = time.perf_counter()
        with self.engine_lock:  # take, load, prove and switch versions as one step
            try:
                publication = receiver.take()  # an engine-side receiver loads it here
            except WeightLinkError:
                # a member of the weight group died; keep generating with the weights we
                # have (admission and the staleness bound keep that safe) until the group
                # is re-formed
                self.stats.weight_link_errors += 1
                if self.receiver is receiver:  # not one a re-formation just installed
                    self.receiver = None
                return False
            if publication is None:
                return False
            header = publication.header
            publication.load_into(self.generator)
            self.loaded(header.version)
            if header.probe_token_ids:
                scored = len(header.probe_token_ids) - 1  # every token after the first
                tol = probe_tolerance(self.probe_tolerance, self.dtype, scored)
                check_probe(self.generator, header.probe_token_ids, header.probe_logprob, tol)
            self.version = header.version
        self.stats.weight_loads += 1
        self.stats.load_s += time.perf_counter() - t0
        return True
