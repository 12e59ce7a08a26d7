"""The processes of a run under Ray: the replay service, the learner, the rollout actors, and
the weight group that joins learner and actors.

Invariants:
- the weight group always holds the learner (rank 0) and every live actor (ranks 1..N);
  whenever it is (re)formed, the learner publishes its current weights at its current
  version, so a newcomer never generates with weights the learner does not have;
- an actor whose process died is restarted by Ray (``max_restarts``); ``heal`` waits for it,
  re-forms the group on a fresh port and restarts its loop, while the learner keeps training;
- an actor loop that ended with an application error (e.g. a failed weight probe) is a bug
  and is raised, not healed.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import replace

from flowrl_async.config import TrainConfig
from flowrl_async.net import free_port
from flowrl_async.run.placement import Placement


def threads_env(threads: int) -> dict[str, str]:
    # every thread of the process (Ray runs calls on pool threads) must see the engine's
    # thread count: vLLM's CPU kernels check it on each call
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def model_vocab_size(model_path: str) -> int | None:
    """The model's embedding rows (config.json's vocab_size): token ids must be below it."""
    import json
    from pathlib import Path

    config = Path(model_path) / "config.json"
    return json.loads(config.read_text()).get("vocab_size") if config.exists() else None


def replay_config(cfg: TrainConfig, run_dir, address: str, model_path: str | None = None):
    """The replay service's settings for this run (any process wiring uses the same);
    ``model_path``: the policy, whose vocabulary bounds the token ids the service accepts."""
    from flowrl_async.replay.config import ServerConfig, settings_of

    settings = settings_of(cfg.replay)
    if cfg.mode == "sync":  # lock-step: every trained group is from the current weights
        settings["max_staleness"] = 0
    lc = cfg.learner
    return ServerConfig(
        directory=str(run_dir / "replay"), address=address, seed=cfg.seed,
        groups_per_version=lc.batch_groups * lc.publish_every,
        vocab_size=model_vocab_size(model_path) if model_path else None, **settings,
    )  # fmt: skip


def replay_keys(cfg: TrainConfig, learner: bool = False) -> dict:
    """ReplayClient's CURVE keyword arguments (empty without encryption); ``learner``: the
    learner's, with its own key when it has one (replay/curve.py: roles)."""
    rc = cfg.replay
    if rc.curve_secret_key is None:
        return {}
    own = rc.curve_learner_key if learner and rc.curve_learner_key else rc.curve_client_key
    return {"curve_server_key": rc.curve_public_key or rc.curve_secret_key, "curve_client_key": own}


def learner_args(cfg: TrainConfig, model_path: str, address: str, device: str,
                 probe_text: str) -> tuple[tuple, dict]:  # fmt: skip
    """LearnerWorker's (args, kwargs) for this run."""
    lc = cfg.learner
    algo = cfg.algo
    if algo.temperature is None:  # the learner's log-probs at the actors' temperature
        algo = replace(algo, temperature=cfg.generator.temperature)
    if algo.norm_len is None and algo.loss_agg == "seq-mean-token-sum-norm":  # Dr. GRPO's
        algo = replace(algo, norm_len=cfg.generator.max_tokens)  # constant: the length limit
    return (model_path, algo, address), dict(
        batch_groups=lc.batch_groups, micro_batch=lc.micro_batch, lr=lc.lr,
        max_tokens_per_micro=lc.max_tokens_per_micro, logprob_chunk=lc.logprob_chunk,
        max_skipped_steps=lc.max_skipped_steps, log_z_grad_clip=lc.log_z_grad_clip,
        gradient_checkpointing=lc.gradient_checkpointing,
        log_z_lr=lc.log_z_lr, grad_clip=lc.grad_clip, warmup_steps=lc.warmup_steps,
        publish_every=lc.publish_every, probe_text=probe_text, seed=cfg.seed,
        threads=lc.threads, device=device, sample_timeout_s=lc.sample_timeout_s,
        dtype=cfg.model.dtype,
        replay_keys=replay_keys(cfg, learner=True),
    )  # fmt: skip


def actor_args(cfg: TrainConfig, actor_id: int, model_path: str, address: str):
    """RolloutWorker's (args, kwargs) for actor ``actor_id`` (1..N)."""
    from flowrl_async.actors.generator import SampleSpec

    gc = cfg.generator
    spec = SampleSpec(gc.n, gc.temperature, gc.top_p, gc.max_tokens)
    return (actor_id, model_path, cfg.task.target, dict(cfg.task.kwargs), address, spec), dict(
        groups_per_batch=gc.groups_per_batch, engine=gc.engine, data_seed=cfg.seed,
        seed=cfg.seed, threads=cfg.cluster.actor_threads, max_model_len=cfg.model.max_model_len,
        dtype=cfg.model.dtype, probe_tolerance=gc.probe_tolerance,
        max_in_flight=gc.max_in_flight if gc.streaming and cfg.mode == "async" else None,
        inflight_updates=gc.inflight_updates, inflight_kv=gc.inflight_kv,
        engine_process=gc.engine_process, tensor_parallel_size=gc.tensor_parallel_size,
        replay_keys=replay_keys(cfg),
    )  # fmt: skip


class Processes:
    """The Ray processes of one run and the weight group between them (a Runtime)."""

    def __init__(self, ray, cfg: TrainConfig, model_path: str, run_dir, device: str,
                 backend: str, probe_text: str, placement: Placement):  # fmt: skip
        from flowrl_async.actors.worker import RolloutWorker
        from flowrl_async.learner.worker import LearnerWorker
        from flowrl_async.replay.service import ReplayService

        self.ray, self.backend, self.placement = ray, backend, placement
        self.handles: list = []
        # a fixed address: if the service dies, Ray restarts it on the same directory and
        # port, it recovers from its log, and the clients' retries reconnect by themselves
        host = placement.replay_host
        self.replay = (
            ray.remote(ReplayService)
            .options(
                num_cpus=0,
                max_restarts=cfg.cluster.max_actor_restarts,
                max_task_retries=-1,
                **placement.replay,
            )
            .remote(replay_config(cfg, run_dir, f"tcp://{host}:{free_port(host)}", model_path))
        )
        self.handles.append(self.replay)
        address = ray.get(self.replay.address.remote())
        threads = cfg.learner.threads
        args, kwargs = learner_args(cfg, model_path, address, device, probe_text)
        world = cfg.learner.world_size
        self.learners = [  # learner ranks; rank 0 samples, publishes and writes
            ray.remote(LearnerWorker)
            .options(
                num_cpus=threads,
                num_gpus=1 if device == "cuda" else 0,
                max_concurrency=3,
                runtime_env={"env_vars": threads_env(threads)},
                **placement.learners[rank],
            )
            .remote(*args, **kwargs, rank=rank, world_size=world, own_process=True)
            for rank in range(world)
        ]
        self.learner = self.learners[0]
        self.handles.extend(self.learners)
        threads = cfg.cluster.actor_threads
        self.actors = []
        for i in range(cfg.cluster.num_actors):
            args, kwargs = actor_args(cfg, i + 1, model_path, address)
            self.actors.append(
                ray.remote(RolloutWorker)
                .options(
                    num_cpus=threads,
                    num_gpus=cfg.cluster.actor_gpus,  # what its bundle reserved, made visible
                    max_concurrency=3,
                    max_restarts=cfg.cluster.max_actor_restarts,
                    max_task_retries=0,
                    runtime_env={"env_vars": threads_env(threads)},
                    **placement.actors[i],
                )
                .remote(*args, **kwargs)
            )
        self.handles.extend(self.actors)
        self.loops: dict = {}  # loop ref -> actor index
        self.restarts = 0
        self.restarting: dict[int, float] = {}  # actor index -> when its death was noticed
        self.died: dict[int, str] = {}  # actor index -> Ray's reason for its last death
        self.restart_timeout_s = 300.0
        self.weight_endpoint: tuple[str, int] | None = None  # set when the group forms
        ray.get([h.ready.remote() for h in [*self.learners, *self.actors]])
        if world > 1:  # the ranks form their own group (rank 0 hosts its store) and shard
            host, port = ray.get(self.learner.weight_endpoint.remote(placement.loopback))
            learner_backend = "nccl" if device == "cuda" else "gloo"
            ray.get([r.join_learner_group.remote(host, port, learner_backend)
                     for r in self.learners])  # fmt: skip

    # ---------------------------------------------------------------- weight group
    def form_weight_group(self) -> int:
        """(Re)form the group on a fresh port and publish the current weights; -> version."""
        if not self.actors:  # offline: nobody to send weights to
            return self.ray.get(self.learner.state.remote())["version"]
        from ray.exceptions import RayActorError

        try:
            host, port = self.ray.get(self.learner.weight_endpoint.remote(self.placement.loopback))
            world = len(self.actors) + 1
            self.weight_endpoint = (host, port)  # where the newest group's store lives
            self.ray.get(
                [self.learner.init_weight_group.remote(host, port, world, self.backend)]
                + [
                    a.init_weight_group.remote(host, port, i + 1, world, self.backend)
                    for i, a in enumerate(self.actors)
                ]
            )
            with no_interrupt():
                refs = [r.publish_current.remote() for r in self.learners]
            return self.ray.get(refs)[0]
        except RayActorError as e:
            if self._learner_alive():
                raise  # an actor died again while joining: heal notices it next time
            raise LearnerDied(f"the learner process died while forming the group: {e}") from e

    def _learner_alive(self) -> bool:
        try:
            self.ray.get(self.learner.ready.remote(), timeout=10)
            return True
        except Exception:
            return False

    def start_loops(self, indices=None) -> None:
        for i in range(len(self.actors)) if indices is None else indices:
            self.loops[self.actors[i].run.remote()] = i

    def generate_batch(self, batches_per_actor: int) -> float:
        """mode=sync: every actor generates ``batches_per_actor`` batches now; -> seconds."""
        started = time.perf_counter()
        self.ray.get([a.run.remote(batches_per_actor) for a in self.actors])
        return time.perf_counter() - started

    # ---------------------------------------------------------------- health
    def heal(self, reform: bool = True) -> None:
        """Notice dead actors, wait (without blocking training) for Ray to restart them, then
        (unless ``reform`` is False) re-form the weight group and restart their loops. Raise
        the error of a loop that failed for any other reason."""
        from ray.exceptions import RayActorError

        if self.loops:
            finished, _ = self.ray.wait(list(self.loops), num_returns=len(self.loops), timeout=0)
            for ref in finished:
                index = self.loops.pop(ref)
                try:
                    self.ray.get(ref)
                except RayActorError as e:
                    self.restarting[index] = time.monotonic()
                    self.died[index] = self._death_reason(index, e)
                    continue
                raise RuntimeError(f"rollout actor {index + 1} stopped before the learner ended")
        if not self.restarting or not reform:
            return
        for index, since in list(self.restarting.items()):
            try:  # calls fail while Ray restarts the process
                self.ray.get(self.actors[index].ready.remote(), timeout=0.5)
            except Exception:
                if time.monotonic() - since > self.restart_timeout_s:
                    raise RuntimeError(f"rollout actor {index + 1} did not come back") from None
                return
        back = sorted(self.restarting)
        self.restarting.clear()
        self.restarts += len(back)
        version = self.form_weight_group()
        for i in back:
            print(f"\nrestarted actor {i + 1} (Ray: {self.died.get(i)})", flush=True)
        print(f"weight group re-formed at version {version}", flush=True)
        self.start_loops(back)

    def call_learner(self, method: str, *args, poll_s: float = 1.0, heal: bool = True):
        """A learner call that keeps the actors healthy while it waits (``heal=False``: it
        does not, e.g. at the end of a run); a dead learner process raises LearnerDied (the
        learner is not restarted: resume from a checkpoint). A collective call goes to
        every rank; rank 0's answer is kept; the first rank that fails ends the wait."""

        ranks = self.learners if method in COLLECTIVE else [self.learner]
        with no_interrupt():  # every rank gets the call, or none: collectives pair by order
            refs = [getattr(r, method).remote(*args) for r in ranks]
        # with several ranks, dead actors are noticed while a call is in flight, but the
        # weight group (whose publication is a collective too) is re-formed only after it
        reform = len(self.learners) == 1
        pending = list(refs)
        while pending:
            ready, pending = self.ray.wait(pending, num_returns=len(pending), timeout=poll_s)
            for ref in ready:
                try:
                    self.ray.get(ref)
                except Exception as e:
                    self._raise_failure(refs, method, e)
            if pending and heal:
                self.heal(reform=reform)
        result = self.ray.get(refs[0])
        if heal:
            self.heal()
        return result

    def _raise_failure(self, refs: list, method: str, error: Exception, wait_s: float = 10.0):
        """A rank's call failed: a dead learner process is LearnerDied (its peers' collectives
        usually fail first), else rank 0's own error (it says more, e.g. why sampling
        failed), else ``error``."""
        from ray.exceptions import RayActorError

        done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=wait_s)
        errors = {}
        for ref in done:
            try:
                self.ray.get(ref)
            except Exception as e:
                errors[ref] = e
        for e in (error, *errors.values()):
            if isinstance(e, RayActorError):
                raise LearnerDied(f"a learner process died during {method}: {e}") from e
        raise errors.get(refs[0], error)

    # ---------------------------------------------------------------- the driver's calls
    def learner_step(self) -> dict:
        return self.call_learner("step")

    def save_checkpoint(self, root: str, keep: int) -> str:
        return self.call_learner("save_checkpoint", root, keep)

    def evaluate(self, split: str, samples: int, temperature: float, max_tokens: int) -> dict:
        return self.ray.get(self.actors[0].evaluate.remote(split, samples, temperature, max_tokens))

    def replay_stats(self, timeout_s: float = 30.0) -> dict:
        """The replay service's figures (raises what the call raised: callers decide)."""
        return self.ray.get(self.replay.stats.remote(), timeout=timeout_s)

    def actor_stats(self, timeout_s: float = 10.0) -> list[dict]:
        """Each actor's figures; an actor that cannot answer (dead, restarting, killed for
        memory) gets ``{"actor": i, "unavailable": Ray's reason}`` instead, so a summary is
        written whatever state the actors are in."""
        refs, out = [], []
        for a in self.actors:
            try:
                refs.append(a.stats.remote())
            except Exception as e:  # a handle whose actor is gone may refuse the call
                refs.append(e)
        for i, ref in enumerate(refs):
            try:
                if isinstance(ref, Exception):
                    raise ref
                out.append(self.ray.get(ref, timeout=timeout_s))
            except Exception as e:
                out.append({"actor": i + 1, "unavailable": self._why_unavailable(i, e)})
        return out

    def _why_unavailable(self, index: int, error: Exception) -> str:
        """Ray's reason: its memory monitor's kill, the error the actor's loop ended with,
        or the actor table's death cause; else what the failed call raised."""
        from ray.exceptions import RayActorError

        for ref, i in list(self.loops.items()):
            # a dead actor's loop ends with Ray's error for the death, soon after it
            if i == index and self.ray.wait([ref], timeout=5.0)[0]:
                try:
                    self.ray.get(ref)
                except RayActorError as e:
                    self.died[index] = self._death_reason(index, e)
                except Exception:
                    pass
        return (
            memory_kill(self.ray, self.actors[index])
            or self.died.get(index)
            or death_cause(self.ray, self.actors[index])
            or ray_reason(error)
        )

    def _death_reason(self, index: int, error: BaseException) -> str:
        return memory_kill(self.ray, self.actors[index]) or ray_reason(error)

    # ---------------------------------------------------------------- teardown
    def shutdown(self) -> None:
        for a in self.actors:
            _quietly(lambda a=a: a.stop.remote())
        stops = []  # every rank at once: leaving the learner group is a collective
        for r in self.learners:
            _quietly(lambda r=r: stops.append(r.stop.remote()))
        _quietly(lambda: self.ray.get(stops, timeout=30))
        time.sleep(0.5)
        for h in self.handles:
            _quietly(lambda h=h: self.ray.kill(h))
        if self.placement.group is not None:
            _quietly(lambda: self.ray.util.remove_placement_group(self.placement.group))


# learner calls every rank must join (they gather, broadcast or shard)
COLLECTIVE = {"step", "save_checkpoint", "resume", "save_policy", "publish_current"}
COLLECTIVE |= {"start_at_version"}


class LearnerDied(RuntimeError):
    """The learner's process is gone; the run cannot go on without a resume."""


@contextmanager
def no_interrupt():
    """Ctrl-C waits until the block is done (it is delivered right after). A handler of our
    own records it: blocking the signal would only hold it back from this thread, and the
    kernel gives it to any other thread of the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list = []
    previous = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(*caught[0])


def death_cause(ray, handle) -> str | None:
    """Why Ray says the actor behind ``handle`` last died (e.g. ``OUT_OF_MEMORY: ...`` when
    its memory monitor killed it), from the GCS actor table; None when it never died or the
    table cannot be read."""
    try:
        from ray._private.state import actors

        info = actors(handle._actor_id.hex())
        cause = info.get("DeathCause")
        if cause is None:
            return None
        for field in ("actor_died_error_context", "oom_context", "runtime_env_failed_context"):
            if cause.HasField(field):
                context = getattr(cause, field)
                reason = getattr(context, "reason", None)
                name = type(context).DESCRIPTOR.fields_by_name
                label = (
                    name["reason"].enum_type.values_by_number[reason].name
                    if reason is not None and "reason" in name
                    else field
                )
                return f"{info.get('State', '?')}, {label}: {context.error_message[:400]}"
        return None  # an empty cause: it never died (or came back)
    except Exception:
        return None


def memory_kill(ray, handle) -> str | None:
    """``killed by Ray's memory monitor: <its kill details>`` when the raylet of this node
    logged that it killed the actor behind ``handle`` for memory; else None. A restarting
    actor's errors and actor-table entry do not say why it died: only this log does (on
    a cluster, only for actors on the driver's node)."""
    try:
        from pathlib import Path

        session = ray._private.worker._global_node.get_session_dir_path()
        log = Path(session) / "logs" / "raylet.out"
        marker = f"Actor({handle._actor_id.hex()})"
        details, found = None, None
        with open(log, errors="replace") as f:
            for line in f:
                if "kill details:" in line:
                    details = line.split("kill details:", 1)[1].strip()
                elif "Selected to kill" in line and marker in line and details:
                    found = details
        return f"killed by Ray's memory monitor: {found}" if found else None
    except Exception:
        return None


def ray_reason(error: BaseException, limit: int = 400) -> str:
    """The part of a Ray actor error that says why: its "Worker exit detail" (e.g. "Task was
    killed due to the node running low on memory ..." from Ray's memory monitor), else its
    last line, prefixed with the error's type."""
    text = str(error)
    if "exit detail:" in text:
        text = text.split("exit detail:", 1)[1]
    else:
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        text = lines[-1] if lines else ""
    text = f"{type(error).__name__}: {text.strip()}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quietly(fn) -> None:
    try:
        fn()
    except Exception:
        pass
