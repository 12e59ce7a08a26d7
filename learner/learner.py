"""The learner: sample whole groups, apply the objective with IS weights, step, publish.

One step (``Learner.step``) reads like the method:
    groups  = replay.sample(batch_size, version)            # whole groups, staleness-bounded
    batch   = collate(groups)
    rewards = normalise(rewards within each group)           # or raw, as configured
    for micro in batch:                                      # gradient accumulation
        π_θ, log Z = policy(micro);  π_ref = ref(micro)
        loss = objective(π_θ, π_ref, μ (recorded), log Z, rewards) / len(batch)
        loss.backward()
    clip grads; optimizer.step(); scheduler.step()
    every publish_every steps: version += 1; publish weights

Invariants: the loss of a step is divided by the step's real number of sequences, however it
is split into micro-batches; behaviour log-probs are the recorded ones; the reference policy
and log Z head never reach the actors.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from flowrl_async.learner.batch import (
    PolicyForward,
    TrainBatch,
    collate,
    micro_batches,
    probe_batch,
)
from flowrl_async.learner.config import AlgoConfig
from flowrl_async.learner.objective import OBJECTIVES, LossInputs
from flowrl_async.learner.objectives import masked_mean, masked_sum
from flowrl_async.learner.sharding import (
    Buffers,
    Ranks,
    clip_grads,
    full_tensor,
    gather_buckets,
    shard,
)
from flowrl_async.model import sequence_logprob
from flowrl_async.weights import DEFAULT_BUCKET_BYTES, plan_buckets


class SamplingMismatch(ValueError):
    """A group was sampled at settings the learner's log-probs do not reproduce."""


class NonFiniteError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient norm."""


def no_dropout(model) -> None:
    """Dropout off in training mode too: every nn.Dropout at p = 0, and every float module
    attribute a forward reads as a dropout rate (``attention_dropout``, OPT's ``dropout``,
    Bloom's ``hidden_dropout``, ``*_pdrop``, ``layerdrop``) at 0. The config is left as the
    model's own (checkpoints keep it)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and (
                "dropout" in name or "pdrop" in name or name == "layerdrop"
            ):
                setattr(module, name, 0.0)


def lr_factor(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


class Learner:
    """Samples whole groups, applies the objective with IS weights, steps, publishes."""

    def __init__(
        self,
        policy,
        ref_policy,
        log_z_head,
        algo: AlgoConfig,
        sample_fn,
        pad_token_id: int,
        batch_groups: int = 8,
        micro_batch: int = 64,
        max_tokens_per_micro: int | None = None,
        logprob_chunk: int | None = 1024,
        lr: float = 1e-4,
        log_z_lr: float = 1e-3,
        weight_decay: float = 0.0,
        grad_clip: float = 1.0,
        warmup_steps: int = 0,
        publish_every: int = 1,
        publish_fn=None,
        probe_token_ids: tuple[int, ...] = (),
        device: str = "cpu",
        ranks: Ranks | None = None,
        param_dtype: torch.dtype | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        max_skipped_steps: int = 5,
        log_z_grad_clip: float | None = None,
    ):
        """``param_dtype`` (e.g. torch.bfloat16): the compute dtype of policy and reference,
        and the dtype weights are published in; the optimizer keeps fp32 master weights
        and gradients are reduced in fp32. None: everything in the policy's own dtype."""
        self.policy, self.ref, self.log_z = policy.train(), ref_policy.eval(), log_z_head
        no_dropout(policy)  # the log-probs must be the sampling policy's, not a dropped one
        for p in self.ref.parameters():
            p.requires_grad_(False)
        # the forward passes; with L learner ranks, FSDP2 units (learner/sharding.py)
        self.ranks = ranks or Ranks(0, 1, device)
        self.policy_fwd, self.ref_fwd = PolicyForward(policy), PolicyForward(ref_policy)
        self.param_dtype = param_dtype
        if self.ranks.sharded:  # FSDP2's mixed precision casts the shards for compute
            for model, fwd in ((policy, self.policy_fwd), (ref_policy, self.ref_fwd)):
                layers = getattr(model, model.base_model_prefix).layers
                shard(fwd, layers, self.ranks.mesh, param_dtype)
        self.algo, self.sample_fn, self.pad = algo, sample_fn, pad_token_id
        self.temperature = 1.0 if algo.temperature is None else algo.temperature
        self.batch_groups, self.micro_batch, self.grad_clip = batch_groups, micro_batch, grad_clip
        self.max_tokens_per_micro, self.logprob_chunk = max_tokens_per_micro, logprob_chunk
        self.publish_every, self.publish_fn = publish_every, publish_fn
        self.bucket_bytes, self.publication_buffers = bucket_bytes, Buffers()
        self.log_z_grad_clip, self.last_log_z_grad_norm = log_z_grad_clip, math.nan
        self.probe_token_ids, self.device = tuple(probe_token_ids), device
        self.objective = OBJECTIVES[algo.name]
        groups = [{"params": list(policy.parameters()), "lr": lr}]
        if self.objective.uses_log_z:
            groups.append({"params": list(log_z_head.parameters()), "lr": log_z_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup_steps)
        )
        self.step_count = 0
        self.version = 0
        self.max_skipped_steps, self.skipped_steps, self.skipped_in_a_row = max_skipped_steps, 0, 0
        self.empty_steps = 0  # steps with no row to train on (every response dropped)
        # what a checkpoint's DCP state holds: the policy and the log Z head
        self.stateful = torch.nn.ModuleDict({"policy": policy, "log_z": log_z_head})

    # ------------------------------------------------------------------ the step
    def step(self) -> dict[str, float]:
        started = time.perf_counter()
        groups, infos = [], []
        if self.ranks.rank == 0:  # rank 0 samples; train_on shares the batch
            try:
                groups, infos = self.sample_fn(self.batch_groups, self.version)
            except BaseException:
                self.ranks.abort_share()  # the other ranks wait for this batch
                raise
        return self.train_on(groups, infos, waited=time.perf_counter() - started)

    def train_on(self, groups, infos, waited: float = 0.0) -> dict[str, float]:
        """One optimizer step on a batch of whole groups (and a publication if it is due);
        with L ranks, every rank calls it (rank 0 with the batch) and trains on its share."""
        started = time.perf_counter() - waited
        groups, infos, mine = self.ranks.share(groups, infos)
        self.check_sampling(groups)  # every rank holds the same groups: all raise together
        batch = collate(groups, [i.staleness for i in infos], self.pad).to(self.device)
        truncated = torch.tensor([r.finish_reason == "length" for g in groups for r in g.responses],
                                 device=self.device)  # fmt: skip
        rewards = self.shape_rewards(batch, truncated)  # whole groups: the same on every rank
        trained = ~truncated if self.algo.truncated == "drop" else torch.ones_like(truncated)
        share = (batch.group_index >= mine.start) & (batch.group_index < mine.stop)
        local = (share & trained).nonzero().view(-1).tolist()  # this rank's rows, in order
        micros = (
            micro_batches(
                batch.select(local),
                self.micro_batch,
                self.max_tokens_per_micro,
                self.objective.whole_groups,
            )
            if local
            else []
        )
        # FSDP averages gradients over the L ranks: dividing by N / L makes their mean the
        # gradient of Σ_all / N, the 1-rank step's (N: the rows trained on, or their
        # response tokens for an objective that weighs every token the same)
        rows = max(1, int(trained.sum())) / self.ranks.world
        normalizer = rows
        if self.objective.per_token(self.algo):
            normalizer = max(1, int(batch.response_mask[trained].sum())) / self.ranks.world
        idle_row = self.idle_row(batch, local or share.nonzero().view(-1).tolist())
        self.optimizer.zero_grad(set_to_none=True)
        publish_s = 0.0  # time in this step's publication (probe, gathers, broadcast)
        totals: Counter = Counter()
        for i in range(self.ranks.max(len(micros))):  # every rank: the same passes
            pad = i >= len(micros)  # a zero-weight pass, only to join the collectives
            picked = [idle_row] if pad else [local[j] for j in micros[i]]
            metrics = self.accumulate(batch.select(picked), rewards[picked], normalizer,
                                      weight=0.0 if pad else 1.0, rows=rows)  # fmt: skip
            # every rank sums the same keys (a rank with only zero-weight passes adds zeros)
            totals.update({k: 0.0 if pad else v * len(picked) for k, v in metrics.items()})
        totals = self.ranks.sum(dict(totals))
        if self.objective.uses_log_z:  # replicated on every rank, not sharded
            self.ranks.average_grads(list(self.log_z.parameters()))
        grad_norm = self.clip()  # the same on every rank
        self.step_count += 1
        skipped = not (math.isfinite(totals.get("loss", 0.0)) and math.isfinite(grad_norm))
        if skipped:  # one NaN update would reach the actors: weights and AdamW untouched
            self.skip_step(totals.get("loss", math.nan), grad_norm)
        elif not trained.any():  # every response dropped (algo.truncated=drop): no update
            self.empty_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.skipped_in_a_row = 0
            self.optimizer.step()
            self.scheduler.step()
            if self.step_count % self.publish_every == 0:
                published = time.perf_counter()
                self.publish()
                publish_s = time.perf_counter() - published
        out = {k: v / max(1, int(trained.sum())) for k, v in totals.items()}
        out["no_eos_ratio"] = float(truncated.float().mean())
        out["empty_steps"] = float(self.empty_steps)
        if self.log_z_grad_clip is not None and self.objective.uses_log_z:
            out["log_z_grad_norm"] = float(self.last_log_z_grad_norm)
        out.update(self.batch_metrics(batch, groups))
        out.update(
            step=self.step_count,
            version=self.version,
            grad_norm=float(grad_norm),
            lr=self.scheduler.get_last_lr()[0],
            wait_s=waited,
            publish_s=publish_s,
            step_s=time.perf_counter() - started,
            tokens=float(batch.response_mask.sum()),
            skipped_steps=float(self.skipped_steps),
        )
        return out

    def skip_step(self, loss: float, grad_norm: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        print(f"learner: step {self.step_count} skipped: loss {loss}, gradient norm {grad_norm} "
              f"({self.skipped_in_a_row} in a row; the norm counts the zero-weight passes "
              "too)", file=sys.stderr, flush=True)  # fmt: skip
        if self.skipped_in_a_row >= self.max_skipped_steps:
            raise NonFiniteError(
                f"{self.skipped_in_a_row} steps in a row had a non-finite loss or gradient "
                f"(the last: step {self.step_count}, loss {loss}, gradient norm {grad_norm}; "
                f"learner.max_skipped_steps={self.max_skipped_steps}): check the rewards, the "
                "behaviour log-probs of the stored groups, and the learning rate"
            )

    @staticmethod
    def idle_row(batch: TrainBatch, rows: list[int]) -> int:
        """The row a zero-weight pass runs on: the shortest of ``rows``."""
        lengths = batch.attention_mask[rows].sum(1).tolist()
        return rows[min(range(len(rows)), key=lambda i: lengths[i])]

    def check_sampling(self, groups) -> None:
        """Refuse groups sampled from another distribution than the one the learner's
        log-probs and IS weights assume: another temperature (unless the objective ignores
        the behaviour policy: off-policy trajectory balance), or top_p < 1 (a behaviour
        without full support never samples part of the target)."""
        any_temperature = self.algo.ignores_behavior()
        for g in groups:
            t, top_p = g.sampling.temperature, g.sampling.top_p
            if (abs(t - self.temperature) > 1e-6 and not any_temperature) or top_p != 1.0:
                raise SamplingMismatch(
                    f"group {g.group_id} was sampled at temperature {t}, top_p {top_p}; the "
                    f"learner computes log-probs at temperature {self.temperature}, top_p 1.0 "
                    f"(its importance weights and target would be wrong): train on it with "
                    f"algo.temperature={t}"
                    + ("" if top_p == 1.0 else ", or not at all (top_p < 1)")
                )

    def clip(self) -> float:
        """Clip the gradients: one norm over policy and log Z head at ``grad_clip``, or
        (``log_z_grad_clip`` set) each by its own norm; -> the norm before clipping (the
        policy's alone in the second case; non-finite if either is)."""
        if self.log_z_grad_clip is None or not self.objective.uses_log_z:
            return clip_grads(self.trainable(), self.grad_clip)
        policy = clip_grads(list(self.policy.parameters()), self.grad_clip)
        head = clip_grads(list(self.log_z.parameters()), self.log_z_grad_clip)
        self.last_log_z_grad_norm = head
        return policy if math.isfinite(head) else head

    def trainable(self):
        params = list(self.policy.parameters())
        if self.objective.uses_log_z:
            params += list(self.log_z.parameters())
        return params

    def shape_rewards(self, batch: TrainBatch, truncated: torch.Tensor | None = None):
        """[N] the rewards the loss uses (``algo.truncated=zero_reward``: a response cut at
        the length limit counts as reward 0, before shaping)."""
        raw = batch.rewards
        if truncated is not None and self.algo.truncated == "zero_reward":
            raw = torch.where(truncated, torch.zeros_like(raw), raw)
        return self.objective.shape_rewards(raw, batch.group_index, self.algo)

    def accumulate(self, micro: TrainBatch, rewards: torch.Tensor, normalizer: float,
                   weight: float = 1.0, rows: float | None = None) -> dict:  # fmt: skip
        """Forward + backward of one micro-batch; the loss is divided by ``normalizer``
        (and multiplied by ``weight``: 0 for a pass that only joins the collectives);
        ``rows`` (default: ``normalizer``): the step's rows per rank, which scale the
        reported loss so that its row-weighted mean is the step's loss."""
        obj = self.objective
        chunk = self.logprob_chunk
        with self._compute_dtype():
            pol = self.policy_fwd(micro, self.temperature, obj.uses_log_z, chunk)
        mask = micro.response_mask
        behavior = micro.behavior_logprobs
        ref = None
        if obj.needs_ref(self.algo):
            with torch.no_grad():
                with self._compute_dtype():
                    ref = self.ref_fwd(micro, self.temperature, False, chunk).logprobs
        log_z = None
        if obj.uses_log_z:  # detached: the trunk learns only from the policy's own terms
            hidden = pol.hidden.detach() if self.algo.log_z_detach else pol.hidden
            log_z = self.log_z(hidden, micro.prompt_mask)
        inputs = LossInputs(pol.logprobs, behavior, mask, rewards, ref, log_z, micro.group_index)
        out = obj.loss(inputs, self.algo, normalizer)
        (out.loss * weight if weight != 1.0 else out.loss).backward()
        with torch.no_grad():
            metrics = dict(out.metrics)
            metrics["loss"] = float(out.loss) * (normalizer if rows is None else rows) / len(micro)
            metrics["entropy"] = float(masked_mean(pol.entropy, mask).mean())
            if ref is not None:
                metrics["kl_ref"] = float(masked_mean(pol.logprobs - ref, mask).mean())
            # the actor-vs-learner gap on rows generated by the learner's current weights
            fresh = micro.version == self.version
            gap = masked_sum((pol.logprobs - behavior).abs(), mask) / mask.sum(-1).clamp(min=1)
            metrics["fresh_rows"] = float(fresh.float().mean())
            metrics["logprob_gap_fresh"] = float(gap[fresh].mean()) if fresh.any() else 0.0
        return metrics

    def batch_metrics(self, batch: TrainBatch, groups) -> dict[str, float]:
        rewards = batch.rewards
        stale = Counter(batch.staleness.tolist())
        distinct = [
            len({r.token_ids.tobytes() for r in g.responses if r.info == "ok"}) for g in groups
        ]
        out = {
            "reward_mean": float(rewards.mean()),
            "accuracy": float(batch.correct.float().mean()),
            "distinct_correct": sum(distinct) / len(groups),
            "groups": float(len(groups)),
            "staleness_mean": float(batch.staleness.float().mean()),
            "staleness_max": float(batch.staleness.max()),
        }
        # rows generated by weights numbered after the learner's (only after a resume: the
        # lost run's weights) are counted apart, not as a negative staleness key
        ahead = sum(v for k, v in stale.items() if k < 0)
        out.update({f"staleness_{k}": v / len(batch) for k, v in sorted(stale.items()) if k >= 0})
        if ahead:
            out["staleness_ahead"] = ahead / len(batch)
        out["response_len"] = float(batch.response_mask.sum(-1).float().mean())
        return out

    # ------------------------------------------------------------------ checkpoints
    def save_state(self, directory: Path) -> None:
        """Write the DCP state of a checkpoint into ``directory`` (learner/checkpoint.py: a
        collective every rank joins; a failed write raises on every rank): sharded policy,
        log Z head, optimizer."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        # before the first step AdamW has no state, and get_state_dict would make some with
        # a step of learning rate 0 (Adam's step count 1): then only the weights are saved
        has_optimizer = bool(self.optimizer.state)
        if has_optimizer:
            model, optim = get_state_dict(self.stateful, self.optimizer)
            state = {"model": model, "optim": optim}
        else:
            state = {"model": get_model_state_dict(self.stateful)}
        dcp.save(state, checkpoint_id=str(directory / "state"))

    def save_local_state(self, directory: Path) -> None:
        """This rank's files of a checkpoint (no collective): its RNG states, and on rank 0
        the scheduler, step and version."""
        torch.save(rng_state(), directory / f"rng-{self.ranks.rank}.pt")
        if self.ranks.rank == 0:
            trainer = {"scheduler": self.scheduler.state_dict(), "step": self.step_count,
                       "version": self.version, "has_optimizer": bool(self.optimizer.state)}  # fmt: skip
            torch.save(trainer, directory / "trainer.pt")

    def load_state(self, directory: Path) -> dict:
        """Load a checkpoint written by any number of ranks (DCP reshards on load; a rank
        with no RNG file of its own takes rank 0's); -> the trainer state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_state_dict,
            set_model_state_dict,
            set_state_dict,
        )

        trainer = torch.load(directory / "trainer.pt", weights_only=False)
        if trainer.get("has_optimizer", True):
            model, optim = get_state_dict(self.stateful, self.optimizer)
            state = {"model": model, "optim": optim}
            dcp.load(state, checkpoint_id=str(directory / "state"))
            set_state_dict(self.stateful, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])  # fmt: skip
        else:  # saved before the first step: the optimizer starts fresh, as it was
            state = {"model": get_model_state_dict(self.stateful)}
            dcp.load(state, checkpoint_id=str(directory / "state"))
            set_model_state_dict(self.stateful, state["model"])
        self.scheduler.load_state_dict(trainer["scheduler"])
        rng = directory / f"rng-{self.ranks.rank}.pt"
        set_rng_state(torch.load(rng if rng.exists() else directory / "rng-0.pt",
                                 weights_only=False))  # fmt: skip
        self.step_count, self.version = trainer["step"], trainer["version"]
        return trainer

    def load_training_state(self, state: dict, policy_state: dict) -> None:
        """A checkpoint of the single-file layout: full tensors, laid out like this rank's."""
        tied = getattr(self.policy.config, "tie_word_embeddings", False)
        if self.ranks.sharded:  # full tensors from disk: every rank keeps its shard
            policy_state = _like(self.policy.state_dict(), policy_state)
        missing, unexpected = self.policy.load_state_dict(policy_state, strict=False)
        missing = [k for k in missing if not (tied and k == "lm_head.weight")]
        if missing or unexpected:
            raise KeyError(
                f"checkpoint does not fit the policy: missing {missing}, unexpected {unexpected}"
            )
        self.log_z.load_state_dict(state["log_z"])
        optimizer = state["optimizer"]
        if self.ranks.sharded:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            optimizer = {**optimizer, "state": {
                i: {k: _shard_like(params[int(i)], v) for k, v in entry.items()}
                for i, entry in optimizer["state"].items()
            }}  # fmt: skip
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step_count, self.version = state["step"], state["version"]

    # ------------------------------------------------------------------ weights
    def _compute_dtype(self):
        """One rank with a compute dtype: autocast (sharded: FSDP2 casts, nothing to do)."""
        import contextlib

        if self.param_dtype is None or self.ranks.sharded:
            return contextlib.nullcontext()
        return torch.autocast(self.device.split(":")[0], dtype=self.param_dtype)

    def publication_specs(self) -> list[tuple[str, torch.Tensor]]:
        """What a publication holds: every policy tensor's name, full shape and publication
        dtype, as meta tensors (nothing allocated; the bucket plan needs no more). A tied
        output layer is left out: it is the input embedding."""
        out = []
        tied = getattr(self.policy.config, "tie_word_embeddings", False)
        for n, p in self.policy.state_dict().items():
            if tied and n == "lm_head.weight":  # the input embedding: receivers re-tie it
                continue
            dtype = self.param_dtype if self.param_dtype and p.is_floating_point() else p.dtype
            out.append((n, torch.empty(p.shape, dtype=dtype, device="meta")))
        return out

    def full_policy_state(self) -> dict | None:
        """The policy's weights on the CPU (sharded: gathered one tensor at a time, a
        collective every rank joins; None on ranks > 0, which keep nothing)."""
        keep = self.ranks.rank == 0
        state = {n: _gathered(p.detach(), keep) for n, p in self.policy.state_dict().items()}
        return state if keep else None

    def probe(self) -> float:
        if not self.probe_token_ids:
            return math.nan
        if not self.ranks.sharded:  # in the compute dtype: what the actors' weights give
            with self._compute_dtype():
                return sequence_logprob(self.policy, self.probe_token_ids)
        with torch.no_grad():  # through the root unit: a collective every rank joins
            out = self.policy_fwd(probe_batch(self.probe_token_ids).to(self.device), 1.0, False)
        return float(out.logprobs.sum())

    def publish(self, new_version: bool = True) -> None:
        """The weights to the actors (``new_version``: as version + 1), bucket by bucket:
        every rank gathers each bucket in turn, rank 0 hands it to ``publish_fn``."""
        self.version += 1 if new_version else 0
        probe = self.probe()
        buckets = plan_buckets(self.publication_specs(), self.bucket_bytes)
        gathered = gather_buckets(self.policy.state_dict(), buckets, self.ranks.rank == 0,
                                  self.publication_buffers)  # fmt: skip
        try:
            if self.publish_fn is not None:
                self.publish_fn(self.version, self.probe_token_ids, probe, buckets, gathered)
        finally:  # whatever publish_fn left: the other ranks wait in these gathers
            for _ in gathered:
                pass


def rng_state() -> dict:
    import random

    import numpy as np

    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _shard_like(param, value):
    """A full tensor the shape of ``param``, laid out as ``param`` is (DTensor: this rank's
    shard); anything else as it is."""
    if not (torch.is_tensor(value) and hasattr(param, "device_mesh")):
        return value
    if tuple(value.shape) != tuple(param.shape):
        return value  # e.g. AdamW's scalar step
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.to_local().device), param.device_mesh, param.placements)


def _like(current: dict, loaded: dict) -> dict:
    """``loaded``'s full tensors, each laid out like the entry of ``current`` it replaces."""
    return {k: _shard_like(current[k], v) if k in current else v for k, v in loaded.items()}


def _gathered(value, keep: bool, cpu: bool = True):
    """A state entry as a full tensor (a DTensor gathered: a collective), on the CPU unless
    ``cpu=False``; None when not ``keep`` (this rank only joins the gather)."""
    if not torch.is_tensor(value):
        return value if keep else None
    full = full_tensor(value)
    if not keep:
        return None
    return full.cpu() if cpu else full
