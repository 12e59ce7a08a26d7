"""LearnerWorker: the process-level shell around Learner (a Ray actor in the orchestrator).

It owns the policy, the frozen reference, the log Z head, a replay client and the weight
sender. ``step`` blocks until the replay service hands over a batch; waiting longer than
``sample_timeout_s`` raises with a clear message instead of hanging a run forever.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import torch

from flowrl_async.heap import freeze_survivors, return_freed_memory
from flowrl_async.learner import checkpoint as ckpt
from flowrl_async.learner.config import AlgoConfig
from flowrl_async.learner.learner import Learner
from flowrl_async.learner.log_z import LogZHead
from flowrl_async.learner.sharding import Ranks
from flowrl_async.learner.weight_sender import WeightSender
from flowrl_async.model import load_policy, load_tokenizer, save_model
from flowrl_async.net import endpoint
from flowrl_async.replay.client import ReplayClient, ReplayError
from flowrl_async.weights import new_group, share_storage


class LearnerWorker:
    """The learner's process: policy, reference, log Z head, replay client, weight sender."""

    def __init__(
        self,
        model_path: str,
        algo: AlgoConfig,
        replay_address: str,
        batch_groups: int = 8,
        micro_batch: int = 64,
        max_tokens_per_micro: int | None = None,
        logprob_chunk: int | None = 1024,
        max_skipped_steps: int = 5,
        log_z_grad_clip: float | None = None,
        gradient_checkpointing: bool = False,
        lr: float = 1e-4,
        log_z_lr: float = 1e-3,
        grad_clip: float = 1.0,
        warmup_steps: int = 0,
        publish_every: int = 1,
        probe_text: str = "",
        seed: int = 0,
        threads: int = 1,
        device: str = "cpu",
        sample_timeout_s: float = 300.0,
        bucket_bytes: int = 64 * 1024 * 1024,
        replay_keys: dict | None = None,
        rank: int = 0,
        world_size: int = 1,
        dtype: str = "float32",
        own_process: bool = False,
    ):
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        if device == "cpu" and own_process:  # a step's transient tensors go back at once
            return_freed_memory()  # (process-wide: not for an in-process learner)
        self.device, self.bucket_bytes = device, bucket_bytes
        self.tokenizer = load_tokenizer(model_path)
        # fp32 master weights; compute (and the reference's weights) in ``dtype``
        compute = None if dtype == "float32" else getattr(torch, dtype)
        policy = load_policy(model_path, device=device)
        ref = load_policy(model_path, dtype=compute or torch.float32, device=device)
        if gradient_checkpointing:  # recompute each decoder layer in backward
            policy.gradient_checkpointing_enable({"use_reentrant": False})
        head = LogZHead(policy.config.hidden_size).to(device)
        self.rank, self.world_size = rank, world_size
        if world_size == 1 and compute is None:  # publications send the weights in place
            share_storage(list(policy.state_dict(keep_vars=True).items()), bucket_bytes)
        keys = replay_keys or {}  # CURVE keyword arguments, when the socket is encrypted
        self.replay = ReplayClient(replay_address, **keys)  # used by step() only
        self.replay_control = ReplayClient(replay_address, **keys)  # other threads
        self.sample_timeout_s = sample_timeout_s
        self.sender: WeightSender | None = None
        self.lock = threading.Lock()  # a step and a checkpoint never overlap
        self.published, self.publish_failures, self.last_publish_error = 0, 0, ""
        probe = tuple(self.tokenizer(probe_text)["input_ids"]) if probe_text else ()

        def build(ranks: Ranks | None) -> Learner:
            return Learner(
                policy, ref, head, algo, self._sample, self.tokenizer.pad_token_id,
                batch_groups=batch_groups, micro_batch=micro_batch, lr=lr, log_z_lr=log_z_lr,
                max_tokens_per_micro=max_tokens_per_micro, logprob_chunk=logprob_chunk,
                max_skipped_steps=max_skipped_steps, log_z_grad_clip=log_z_grad_clip,
                grad_clip=grad_clip, warmup_steps=warmup_steps, publish_every=publish_every,
                publish_fn=self._publish if rank == 0 else None, probe_token_ids=probe,
                device=device, ranks=ranks, param_dtype=compute, bucket_bytes=bucket_bytes,
            )  # fmt: skip

        self._build = build
        # one rank: ready now; L ranks: once they formed their group (join_learner_group)
        self.learner: Learner | None = build(None) if world_size == 1 else None
        freeze_survivors()  # modules and models: out of the collector's way
        self._froze_after_step = False

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        import os

        return os.getpid()

    def weight_endpoint(self, loopback: bool) -> tuple[str, int]:
        """Where this learner (rank 0) will host the weight group's TCPStore: its node's IP
        (loopback on one machine) and a port free on its node."""
        return endpoint(loopback)

    def join_learner_group(self, host: str, port: int, backend: str) -> int:
        """Learner ranks: form their group (rank 0's TCPStore at host:port), then shard
        policy and reference; every rank calls it at once."""
        device = "cuda" if backend == "nccl" else "cpu"
        # a collective may wait for rank 0's sampling: the group's timeout is longer
        # (and rank 0 may wait on a slow actor in a publication's broadcasts: the weight
        # group's own timeout is 600 s, so a weight-group stall fails there first)
        timeout_s = max(1800.0, 2 * self.sample_timeout_s + 60)
        ranks = Ranks.join(host, port, self.rank, self.world_size, backend, device, timeout_s)
        self.learner = self._build(ranks)
        freeze_survivors()
        return self.rank

    def init_weight_group(self, host: str, port: int, world: int, backend: str) -> int:
        device = "cuda" if backend == "nccl" else "cpu"  # NCCL sends from GPU memory only
        group = new_group(host, port, 0, world, backend)
        self.sender = WeightSender(group, self.bucket_bytes, device=device)
        return 0

    def _sample(self, batch_size: int, version: int):
        deadline = time.monotonic() + self.sample_timeout_s
        while time.monotonic() < deadline:
            got = self.replay.sample(batch_size, version, timeout_s=1.0)
            if got is not None:
                return [g for g, _ in got], [i for _, i in got]
        raise TimeoutError(
            f"learner waited {self.sample_timeout_s:.0f}s for {batch_size} groups at version "
            f"{version}: are the actors alive? replay stats: {self.replay.stats()}"
        )

    def _sample_on_rank0(self):
        if self.rank != 0:
            return [], []  # rank 0's batch arrives in train_on
        return self._sample(self.learner.batch_groups, self.learner.version)

    def _publish(self, version, probe_ids, probe_logprob, buckets, bucket_tensors) -> None:
        """Rank 0: broadcast each bucket as the ranks gather it. A broken group (a member
        died) is dropped, never fatal: training goes on and the orchestrator re-forms the
        group with the restarted actor."""
        self.replay_control.set_version(version)  # admission opens for the new version
        sender, publication = self.sender, None
        if sender is not None:
            try:
                publication = sender.start(buckets, version, probe_ids, probe_logprob)
            except Exception as e:  # gloo/NCCL raise RuntimeError subclasses of many kinds
                self._weight_group_broke(sender, e)
        # the gathers run whatever the weight group does: the other learner ranks are in
        # them (a failed gather is the learner group's failure, and raises)
        for bucket, tensors in bucket_tensors:
            if publication is not None:
                publication.send(bucket, tensors)  # never raises: finish() does
        if publication is not None:
            try:
                publication.finish()
                self.published += 1
            except Exception as e:
                self._weight_group_broke(sender, e)

    def _weight_group_broke(self, sender, error: Exception) -> None:
        self.publish_failures += 1
        self.last_publish_error = f"{type(error).__name__}: {error}"
        if self.sender is sender:
            self.sender = None

    def step(self) -> dict:
        # waiting for data holds no lock: a group re-formation (publish_current) or a
        # checkpoint may run meanwhile
        # (L ranks: every collective of every rank happens in the same order, so a step
        # holds the lock from the start; the orchestrator never overlaps collective calls)
        started = time.perf_counter()
        if self.world_size > 1:
            with self.lock:
                try:
                    groups, infos = self._sample_on_rank0()
                except BaseException:
                    self.learner.ranks.abort_share()  # the other ranks wait for this batch
                    raise
                out = self.learner.train_on(groups, infos, waited=time.perf_counter() - started)
        else:
            groups, infos = self._sample(self.learner.batch_groups, self.learner.version)
            with self.lock:
                out = self.learner.train_on(groups, infos, waited=time.perf_counter() - started)
        if not self._froze_after_step:  # the optimizer's state, made by the first step
            self._froze_after_step = True
            freeze_survivors()
        return out

    @property
    def step_count(self) -> int:
        return self.learner.step_count

    def state(self) -> dict:
        return {
            "step": self.learner.step_count,
            "version": self.learner.version,
            "published": self.published,
            "publish_failures": self.publish_failures,
            "skipped_steps": self.learner.skipped_steps,
            "empty_steps": self.learner.empty_steps,
            "last_publish_error": self.last_publish_error,
        }

    def start_at_version(self, version: int) -> int:
        """A fresh learner training on stored groups numbers its versions after theirs."""
        with self.lock:
            self.learner.version = version
            if self.rank == 0:
                self.replay_control.set_version(version)
            return version

    def publish_current(self) -> int:
        """Send the current weights at the current version (a new or rebuilt group)."""
        with self.lock:
            self.learner.publish(new_version=False)  # collectives: every rank calls it
            return self.learner.version

    def save_checkpoint(self, root: str, keep: int, extra: dict | None = None) -> str:
        """The learner's checkpoint (learner/checkpoint.py: every rank writes its shards,
        rank 0 the Hugging Face export), and the replay service's taken at the same point."""
        with self.lock:
            lrn = self.learner

            def extra_with_replay() -> dict:  # rank 0, once the state is written
                replay = self.replay_control.checkpoint(f"step-{lrn.step_count:08d}")
                return {**(extra or {}), "replay_checkpoint": replay}

            path = ckpt.save(root, lrn, self.tokenizer, keep, extra_with_replay)
            if self.rank == 0:
                self._prune_replay_checkpoints(root)
            return str(path) if self.rank == 0 else ""

    def _prune_replay_checkpoints(self, root: str) -> None:
        """Once the learner's checkpoint is on disk (and its old ones pruned): the service
        keeps the replay checkpoints the remaining ones refer to (and its newest)."""
        names = []
        for path in ckpt.checkpoints(root):
            extra = path / "extra.json"
            if extra.is_file():
                ref = json.loads(extra.read_text()).get("replay_checkpoint") or {}
                names += [ref["path"]] if "path" in ref else []
        try:
            self.replay_control.prune(names)
        except ReplayError as e:  # a failed prune costs disk, not training
            print(f"learner: pruning replay checkpoints failed: {e}", file=sys.stderr)

    def resume(self, root: str) -> dict:
        """Load the newest checkpoint under ``root`` and rewind the replay service to the
        replay checkpoint taken with it (the groups sampled since, for updates now lost, are
        offered again); -> its step, version and extra, and ``replay_rewind``: what the
        service answered, or the error that kept it from rewinding (training goes on)."""
        path = ckpt.latest(root)
        if path is None:
            raise FileNotFoundError(f"resume: no checkpoint under {root}")
        extra = ckpt.read_extra(path)
        with self.lock:
            state = ckpt.load(path, self.learner)  # every rank reads its shards
            rewind = None
            if "replay_checkpoint" in extra and self.rank == 0:
                try:
                    rewind = self.replay_control.rewind(extra["replay_checkpoint"]["path"])
                except ReplayError as e:  # e.g. a fresh replay directory: nothing to rewind
                    rewind = {"error": str(e)}
        return {
            "path": str(path), "step": state["step"], "version": state["version"], **extra,
            "replay_rewind": rewind,
        }  # fmt: skip

    def save_policy(self, path: str) -> str:
        """The policy in Hugging Face format (every rank gathers; rank 0 writes)."""
        weights = self.learner.full_policy_state()
        if self.rank != 0:
            return path
        return str(save_model(path, self.learner.policy, self.tokenizer, weights))

    def stop(self) -> None:
        try:
            if self.sender is not None:
                self.sender.stop()
                self.sender = None
        finally:  # the other ranks wait for this one to leave the learner group
            if self.learner is not None and self.world_size > 1:
                self.learner.ranks.close()
