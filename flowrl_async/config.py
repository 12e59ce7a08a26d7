"""The configuration schema: structured configs registered in Hydra's ConfigStore.

``configs/train.yaml`` picks one option per group (algo, model, task, generator, replay,
learner, cluster); every field below can be overridden on the command line, e.g.
``flowrl-async train algo=grpo replay.max_staleness=4 learner.steps=50``.
``validate`` rejects bad combinations at start-up with a message that names the fields.
Each component owns its settings and choice lists (``learner/config.py``,
``replay/config.py``, ``actors/config.py``); this tree uses them as they are. Components
never read this tree: the orchestrator turns it into flat constructor arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from flowrl_async.actors.config import ENGINES, KV_MODES
from flowrl_async.learner.config import IS_MODES, OBJECTIVES, REWARD_NORMS, AlgoConfig
from flowrl_async.replay.config import ADMISSIONS, FSYNC, SELECTORS, ReplaySettings, ServerConfig
from flowrl_async.replay.filter import GroupFilter, parse_time

PLACEMENTS = ("SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK")
DTYPES = ("float32", "bfloat16")
BUILTIN_MODELS = ("tiny", "qwen2_0p5b_shape")
MODES = ("async", "sync")


@dataclass
class ModelSection:
    """Which policy the run starts from, and its dtype."""

    path: str | None = None
    """A local Hugging Face model directory; null builds the model ``builtin`` names."""
    builtin: str = "tiny"
    """Built offline when path is null: tiny (a 2.4M-parameter Llama with a character
    tokenizer, format warm-started) or qwen2_0p5b_shape (Qwen2.5-0.5B's architecture and
    shapes, random weights, a byte-level BPE tokenizer trained on the task's text)."""
    dtype: str = "float32"
    """Compute dtype of learner and actors: float32, or bfloat16 (the learner keeps fp32
    master weights and AdamW state, computes policy and reference in bf16, publishes bf16
    weights; the probe's tolerance grows by 5e-2 a token)."""
    init_seed: int = 0
    """Seed of the built-in model's random initialisation."""
    warm_start_steps: int = 80
    """Supervised format warm-start steps before RL (0 to skip)."""
    warm_start_lr: float = 2e-3
    """Learning rate of the warm-start."""
    max_model_len: int = 256
    """Longest prompt + response the engines must handle."""


@dataclass
class TaskSection:
    """The task: its class and constructor arguments."""

    target: str = "flowrl_async.tasks.digits.DigitSumTask"
    """Import path of the task class; users plug their own in here."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the task's constructor."""


@dataclass
class GeneratorSection:
    """How the actors sample: engine, group size, temperature, lengths."""

    engine: str = "vllm"
    """Generation engine in the actors: vllm or torch (plain PyTorch sampler)."""
    n: int = 8
    """Responses per prompt (the group size)."""
    temperature: float = 1.0
    """Sampling temperature; the learner computes log-probs at the same temperature (unless
    algo.temperature differs: off-policy trajectory balance only)."""
    top_p: float = 1.0
    """Nucleus sampling; keep 1.0 for RL (the learner does not truncate its log-probs).
    top_k, min_p, min_tokens, penalties, logit bias, bad words and structured outputs are
    deliberately not settings: vLLM's recorded log-probs include them and the learner's do
    not (actors/vllm_generator.py refuses them; a checkpoint's generation_config.json is
    ignored)."""
    max_tokens: int = 8
    """Longest response in tokens."""
    groups_per_batch: int = 4
    """Prompts an actor generates for at once (it asks admission for this many)."""
    probe_tolerance: float = 1e-3
    """Largest accepted gap between actor and learner probe log-probs after a load."""
    streaming: bool = True
    """Keep up to ``max_in_flight`` prompts in the engine, push each group as soon as its n
    responses finish, and load new weights between engine steps (actors/streaming.py);
    false: batch by batch (``groups_per_batch`` prompts, each batch waits for its slowest
    response; weights load between batches). mode=sync always runs batch by batch (it
    counts whole batches)."""
    max_in_flight: int = 8
    """streaming: prompts in the engine at once."""
    inflight_updates: bool = True
    """streaming: load a publication between two engine steps while sequences run, which
    go on under the new weights (each token records its version); false: stop admitting
    and load once the engine has drained (no response spans two versions)."""
    inflight_kv: str = "keep"
    """streaming with in-flight updates: what the running sequences' cached keys and values
    become at a load. keep: kept (fastest; tokens after the load are sampled from the new
    weights over the old weights' keys and values, a mixed distribution); recompute: the
    prompt and tokens so far are computed again under the new weights (one prefill per
    running sequence per load; every later token from the new version alone). Either way
    the recorded behaviour log-probs are those each token was sampled with, so the
    learner's importance weights stay exact."""
    engine_process: bool = False
    """vLLM only: run the engine in a process of its own (vLLM's default on GPU) and receive
    weights inside it through a worker extension and collective_rpc; false runs the engine
    in the actor's process (fastest start on CPU)."""
    tensor_parallel_size: int = 1
    """vLLM only: GPUs per engine (vLLM tensor parallelism; needs engine_process=true and
    cluster.actor_gpus >= it). TP rank 0 receives each publication and shares it with the
    other TP workers over vLLM's TP group; every worker loads its shard from the same
    full tensors."""


@dataclass(kw_only=True)
class ReplaySection(ReplaySettings):
    """The service's settings (``ReplaySettings``) plus what the clients and the run need."""

    curve_public_key: str | None = None
    """The server's public certificate file the clients use (null: read it from
    curve_secret_key, which works when every process sees that file)."""
    curve_client_key: str | None = None
    """The clients' own secret certificate file, needed with curve_authorized_keys (the
    actors', when the learner has its own)."""
    curve_learner_key: str | None = None
    """The learner's own secret certificate file, its public half in
    ``curve_authorized_keys/learner/``: only that key may sample, move the version,
    checkpoint, prune or rewind (replay/curve.py); null: the learner uses curve_client_key."""
    metrics_every: int = 10
    """Learner steps between two snapshots of the service's figures in metrics.jsonl
    (replay_*: size, inserts/s, sampled groups/s, evictions by cause, rejections by reason,
    staleness of sampled groups, rate-limiter waits); 0: only in summary.json."""
    preload: str | None = None
    """A stored run's replay directory (RUN/replay): its groups are inserted before training
    starts, for training on stored trajectories (with cluster.num_actors=0: offline)."""
    preload_min_version: int | None = None
    """Preload only groups whose oldest weight version is at least this (null: no bound)."""
    preload_max_version: int | None = None
    """... and at most this."""
    preload_task: str | None = None
    """Preload only groups of this task (its name, e.g. digits, math, code; null: all)."""
    preload_since: str | None = None
    """Preload only groups inserted at or after this time: unix seconds or ISO 8601."""
    preload_until: str | None = None
    """... and at or before this time."""

    def preload_filter(self) -> GroupFilter:
        """The ``GroupFilter`` of the preload_* keys (ValueError when they make no sense)."""
        return GroupFilter(
            self.preload_min_version,
            self.preload_max_version,
            parse_time(self.preload_since),
            parse_time(self.preload_until),
            self.preload_task,
        )


@dataclass
class LearnerSection:
    """The learner's optimisation, publication and checkpoint settings."""

    steps: int = 400
    """Optimizer steps to train."""
    batch_groups: int = 8
    """Groups per optimizer step."""
    micro_batch: int = 64
    """Most sequences per forward/backward pass (gradient accumulation over the step)."""
    log_z_grad_clip: float | None = None
    """FlowRL: clip the log Z head's gradient by its own norm at this value (its learning
    rate is log_z_lr, 10x the policy's by default); null: one norm, policy and head together,
    clipped at grad_clip."""
    max_skipped_steps: int = 5
    """A step whose loss or gradient norm is not finite is skipped (weights and optimizer
    state untouched, counted as ``skipped_steps``); this many in a row stop the run."""
    max_tokens_per_micro: int | None = None
    """Token budget of a micro-batch: rows packed longest first while rows × (longest
    prompt + response) stays within it (a longer row goes alone); null: micro_batch rows
    in order. The loss divides by the step's real totals whatever the split."""
    logprob_chunk: int | None = 1024
    """Positions per pass of the output layer (log-probs and entropy are computed chunk by
    chunk and recomputed in backward: memory O(chunk × vocabulary)); null: all at once."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward (memory for time)."""
    lr: float = 1e-4
    """Policy learning rate (AdamW; the README says why the default is 1e-4)."""
    log_z_lr: float = 1e-3
    """Learning rate of the log Z head."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    warmup_steps: int = 5
    """Linear learning-rate warm-up."""
    publish_every: int = 1
    """Publish weights (version + 1) every this many steps."""
    checkpoint_every: int = 100
    """Save an atomic checkpoint every this many steps (and at the end, and on Ctrl-C)."""
    keep_checkpoints: int = 3
    """Keep only the newest this many checkpoints."""
    sample_timeout_s: float = 300.0
    """The learner gives up (with a clear error) after waiting this long for a batch."""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda."""
    threads: int = 1
    """Torch threads of each learner process."""
    world_size: int = 1
    """Learner ranks: processes (one GPU each on a GPU cluster) that shard policy and
    reference with FSDP2 over their own group (gloo on CPU, NCCL on GPU) and make the same
    update as one learner; each trains on whole groups of rank 0's batch."""


@dataclass
class ClusterSection:
    """Where the processes run: local or a Ray cluster, actor count and placement."""

    address: str | None = None
    """Ray cluster address to join; null starts Ray locally."""
    num_actors: int = 2
    """Rollout actors."""
    actor_threads: int = 1
    """Torch threads per actor (one per process on small machines)."""
    weight_backend: str = "auto"
    """torch.distributed backend for weights: auto (nccl with a GPU learner), gloo, nccl."""
    max_actor_restarts: int = 3
    """Ray restarts a dead actor this many times."""
    actor_gpus: float = 0.0
    """Cluster mode: GPUs reserved per rollout actor (1 for vLLM on CUDA; 0 on CPU nodes)."""
    placement: str = "SPREAD"
    """Cluster mode: Ray placement-group strategy for the learner and actor bundles
    (SPREAD: actors over the nodes; PACK; STRICT_SPREAD; STRICT_PACK)."""


@dataclass
class PeriodicEvalSection:
    """Evaluation during training, on actor 1 with its current weights."""

    every: int = 0
    """Evaluate every this many learner steps (0: never), into metrics.jsonl as eval_*."""
    split: str = "eval"
    """eval (held-out prompts) or train."""
    samples: int = 16
    """Completions per prompt."""
    temperature: float = 1.0
    """Sampling temperature of the evaluation."""


@dataclass
class SimSection:
    """``flowrl-async simulate`` only (train ignores it): the cost model of the simulation."""

    costs: str | None = None
    """A cost file (YAML or JSON: flowrl_async/run/sim/costs.py; written by ``flowrl-async
    simulate calibrate RUN`` or by hand, e.g. docs/sim/h100_7b.yaml); null: the defaults."""
    seed: int | None = None
    """Seed of the simulated response lengths (null: the run's seed)."""


@dataclass
class TrainConfig:
    """Everything ``flowrl-async train`` is configured with."""

    algo: AlgoConfig = field(default_factory=AlgoConfig)
    model: ModelSection = field(default_factory=ModelSection)
    task: TaskSection = field(default_factory=TaskSection)
    generator: GeneratorSection = field(default_factory=GeneratorSection)
    replay: ReplaySection = field(default_factory=ReplaySection)
    learner: LearnerSection = field(default_factory=LearnerSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    evaluation: PeriodicEvalSection = field(default_factory=PeriodicEvalSection)
    sim: SimSection = field(default_factory=SimSection)
    run_dir: str = "runs/latest"
    """Where the run writes its config, metrics, checkpoints, replay log and plots."""
    seed: int = 0
    """Seed of the learner and the actors' samplers."""
    mode: str = "async"
    """async: actors generate without pause while the learner trains. sync: lock-step
    (generate a batch with the current weights, train on it, publish), for comparison and
    debugging; it runs with max_staleness 0."""
    resume: bool = False
    """Continue the run in run_dir from its newest checkpoint (give run_dir explicitly)."""


@dataclass
class EvalConfig:
    """Everything ``flowrl-async eval`` is configured with."""

    checkpoint: str = "???"
    """A model directory, a checkpoint directory (…/checkpoints/step-N) or a run directory
    (its final policy, else its newest checkpoint)."""
    task: TaskSection = field(default_factory=TaskSection)
    split: str = "eval"
    """Which prompts: eval (held out) or train."""
    samples: int = 64
    """Completions per prompt (k)."""
    temperature: float = 1.0
    """Sampling temperature (the paper reports 0.6 and 1.0)."""
    max_tokens: int = 8
    """Longest completion."""
    engine: str = "vllm"
    """vllm or torch."""
    out_dir: str | None = None
    """Where samples.jsonl and eval.json go (default: <checkpoint>/eval-T<temperature>)."""
    seed: int = 0
    """Sampling seed."""
    reference: str | None = None
    """The reference policy π_ref (e.g. RUN/init_model): on tasks with an enumerable valid
    set, eval.json also gets tv_to_target, the TV distance to the target of the objective
    the run used (flowrl_async/tasks/target.py), and tv_to_tb_target, the distance to
    π_ref·exp(β r)/Z (the two are equal except for the mean residual form)."""
    residual: str | None = None
    """The residual form whose target tv_to_target measures (sum, sum_over_len, mean);
    null: the run's own (its run_config.json; flowrl and vargrad use theirs, other
    objectives and a bare model directory: sum)."""
    beta: float | None = None
    """β of that target; null: the run's algo.beta (1.0 without a run)."""
    reference_samples: int = 256
    """Samples of π_ref per prompt for the mean form's normaliser (its mass outside the
    valid set)."""


def validate(cfg: TrainConfig) -> None:
    """Reject bad combinations before anything starts."""
    problems = []
    a, g, r, lr = cfg.algo, cfg.generator, cfg.replay, cfg.learner
    if a.name not in OBJECTIVES:
        problems.append(f"algo.name={a.name!r}: expected one of {OBJECTIVES}")
    if a.is_mode not in IS_MODES:
        problems.append(f"algo.is_mode={a.is_mode!r}: expected one of {IS_MODES}")
    if a.is_level == "token" and a.name not in ("flowrl", "flowrl_no_z", "reinforce"):
        problems.append(f"algo.is_level=token weights tokens: flowrl, flowrl_no_z and reinforce "
                        f"take it (algo.name={a.name}: vargrad has no weights, grpo's ratios "
                        "are per token already)")  # fmt: skip
    if a.loss_agg != "seq-mean-token-mean" and a.name != "grpo":
        problems.append(f"algo.loss_agg={a.loss_agg} is GRPO's: only algo.name=grpo takes it")
    if a.norm_len is not None and a.loss_agg != "seq-mean-token-sum-norm":
        problems.append("algo.norm_len is the divisor of loss_agg=seq-mean-token-sum-norm only")
    if a.norm_len is not None and a.norm_len < 1:
        problems.append(f"algo.norm_len={a.norm_len}: must be >= 1 (or null: generator.max_tokens)")
    if a.name == "vargrad" and a.is_mode != "off":
        problems.append("algo.name=vargrad applies no importance weights: set algo.is_mode=off "
                        "(algo=vargrad does)")  # fmt: skip
    if a.name == "vargrad" and lr.micro_batch < g.n:
        problems.append(f"algo.name=vargrad trains whole groups per micro-batch: "
                        f"learner.micro_batch={lr.micro_batch} < generator.n={g.n}")  # fmt: skip
    if a.clip_ratio_c is not None and a.name != "grpo":
        problems.append("algo.clip_ratio_c is GRPO's dual clip: only algo.name=grpo takes it")
    if a.clip_ratio_c is not None and a.clip_ratio_c <= 1:
        problems.append(f"algo.clip_ratio_c={a.clip_ratio_c}: the dual clip must be > 1 (or null)")
    if a.name == "grpo" and a.is_level != "sequence":
        problems.append("algo.name=grpo weights every token already: leave algo.is_level=sequence")
    if (a.temperature is not None and abs(a.temperature - g.temperature) > 1e-6
            and cfg.cluster.num_actors > 0 and not a.ignores_behavior()):  # fmt: skip
        problems.append(
            f"algo.temperature={a.temperature} differs from generator.temperature="
            f"{g.temperature}: the learner would refuse every group its actors sample (set "
            "algo.temperature only to train on stored groups of another temperature, or "
            "with off-policy trajectory balance, is_mode=off, to sample hotter)"
        )
    if a.is_mode == "mask" and not 0 < a.mask_low < 1 < a.mask_high:
        problems.append("algo.is_mode=mask needs 0 < algo.mask_low < 1 < algo.mask_high")
    if a.name == "grpo" and a.is_mode != "clip":
        problems.append("algo.name=grpo clips per-token ratios: algo.is_mode must be clip")
    if a.reward_norm not in REWARD_NORMS:
        problems.append(f"algo.reward_norm={a.reward_norm!r}: expected one of {REWARD_NORMS}")
    if a.temperature is not None and a.temperature <= 0:
        problems.append(f"algo.temperature={a.temperature}: must be > 0 (or null)")
    if g.engine not in ENGINES:
        problems.append(f"generator.engine={g.engine!r}: expected one of {ENGINES}")
    if g.n < 2 and (a.name not in ("flowrl", "flowrl_no_z") or a.reward_norm == "group"):
        problems.append("generator.n must be >= 2: group-normalised rewards need a group")
    if g.temperature <= 0:
        problems.append(f"generator.temperature={g.temperature}: must be > 0 (the learner's "
                        "log-probs divide by it; greedy decoding has no log-probs to train on)")  # fmt: skip
    if g.top_p != 1.0:
        problems.append("generator.top_p must be 1.0: the learner's log-probs are untruncated")
    if r.selector not in SELECTORS:
        problems.append(f"replay.selector={r.selector!r}: expected one of {SELECTORS}")
    if r.fsync not in FSYNC:
        problems.append(f"replay.fsync={r.fsync!r}: expected one of {FSYNC}")
    if r.selector == "mixed" and r.max_times_sampled < 2:
        problems.append("replay.selector=mixed replays groups: set replay.max_times_sampled >= 2")
    if r.admission not in ADMISSIONS:
        problems.append(f"replay.admission={r.admission!r}: expected one of {ADMISSIONS}")
    if r.admission_lead < 0:
        problems.append(f"replay.admission_lead={r.admission_lead}: must be >= 0")
    if not 0.0 <= r.fresh_fraction <= 1.0:
        problems.append(f"replay.fresh_fraction={r.fresh_fraction}: expected a value in [0, 1]")
    if r.selector == "fifo" and r.max_times_sampled != 1:
        problems.append("replay.selector=fifo uses each group once: set max_times_sampled=1")
    if r.max_staleness is None and a.is_mode != "off":
        problems.append(
            "replay.max_staleness=null (unbounded) needs algo.is_mode=off: IS weights of "
            "arbitrarily old groups are meaningless (off-policy TB uses weight 1; "
            "use algo=flowrl_tb)"
        )
    if r.samples_per_insert is not None and lr.batch_groups > r.min_size_to_sample:
        problems.append(
            "replay.min_size_to_sample must be >= learner.batch_groups when the rate limiter "
            "is on (samples_per_insert set); otherwise a batch can never be served"
        )
    if cfg.cluster.address and not r.insecure:  # the service listens on the node's IP
        curve, keys = r.curve_secret_key is not None, r.curve_authorized_keys is not None
        rules = [
            (not curve, "cluster mode serves the replay service on the node's IP: give it CURVE "
                        "keys (replay.curve_secret_key, python -m flowrl_async.replay.curve DIR "
                        "NAME) or set replay.insecure=true (any peer reaching it could insert or "
                        "drain groups)"),
            (curve and not keys, "cluster mode with CURVE but no replay.curve_authorized_keys is "
                                 "encryption only: anyone with the server's public key may "
                                 "insert, rewind or prune; give the clients' keys directory or "
                                 "set replay.insecure=true"),
            (keys and r.curve_learner_key is None,
             "cluster mode needs the learner's own key (replay.curve_learner_key, its public half "
             "in curve_authorized_keys/learner/): otherwise every actor's key may sample, rewind "
             "and prune; or set replay.insecure=true"),
            (keys and r.curve_public_key is None,
             "cluster mode needs replay.curve_public_key (the server's public certificate): "
             "without it every client reads the server's secret certificate, and with it could "
             "connect as the service itself, which may make every request"),
        ]  # fmt: skip
        problems += [message for broken, message in rules if broken]
    if cfg.generator.inflight_kv not in KV_MODES:
        problems.append(f"generator.inflight_kv={cfg.generator.inflight_kv!r}: expected one of "
                        f"{', '.join(KV_MODES)}")  # fmt: skip
    most = ServerConfig.__dataclass_fields__["max_admit"].default  # one admission's limit
    if cfg.generator.streaming and not 1 <= cfg.generator.max_in_flight <= most:
        problems.append(f"generator.max_in_flight must be in [1, {most}]")
    if r.retain not in ("all", "needed"):
        problems.append(f"replay.retain={r.retain!r}: expected all or needed")
    if r.capacity_bytes is not None and r.capacity_bytes < 1:
        problems.append("replay.capacity_bytes must be >= 1 (or null)")
    if r.metrics_every < 0:
        problems.append("replay.metrics_every must be >= 0 (0: only in summary.json)")
    if r.capacity < lr.batch_groups:
        problems.append("replay.capacity must be >= learner.batch_groups")
    g = cfg.generator
    if g.tensor_parallel_size < 1:
        problems.append("generator.tensor_parallel_size must be >= 1")
    elif g.tensor_parallel_size > 1 and (g.engine != "vllm" or not g.engine_process):
        problems.append("generator.tensor_parallel_size > 1 needs generator.engine=vllm and "
                        "generator.engine_process=true (vLLM's multiprocess executor)")  # fmt: skip
    elif g.tensor_parallel_size > 1 and cfg.cluster.actor_gpus < g.tensor_parallel_size:
        problems.append(f"generator.tensor_parallel_size={g.tensor_parallel_size} needs "
                        f"cluster.actor_gpus >= {g.tensor_parallel_size} (the engine's GPUs)")  # fmt: skip
    if cfg.model.builtin not in BUILTIN_MODELS:
        problems.append(f"model.builtin={cfg.model.builtin!r}: expected one of {BUILTIN_MODELS}")
    if cfg.model.dtype not in DTYPES:
        problems.append(f"model.dtype={cfg.model.dtype!r}: expected one of {DTYPES}")
    if lr.world_size < 1 or lr.batch_groups < lr.world_size:
        problems.append(
            f"learner.world_size={lr.world_size}: must be >= 1 and <= learner.batch_groups "
            f"({lr.batch_groups}): every rank trains on whole groups"
        )
    if lr.log_z_grad_clip is not None and lr.log_z_grad_clip <= 0:
        problems.append("learner.log_z_grad_clip must be > 0 (or null)")
    if lr.max_skipped_steps < 1:
        problems.append("learner.max_skipped_steps must be >= 1")
    if lr.max_tokens_per_micro is not None and lr.max_tokens_per_micro < 1:
        problems.append("learner.max_tokens_per_micro must be >= 1 (or null)")
    if lr.logprob_chunk is not None and lr.logprob_chunk < 1:
        problems.append("learner.logprob_chunk must be >= 1 (or null)")
    if lr.steps < 1 or lr.batch_groups < 1 or lr.publish_every < 1:
        problems.append("learner.steps, batch_groups and publish_every must be >= 1")
    if lr.checkpoint_every < 1 or lr.keep_checkpoints < 1:
        problems.append("learner.checkpoint_every and learner.keep_checkpoints must be >= 1")
    if cfg.evaluation.every < 0 or cfg.evaluation.split not in ("eval", "train"):
        problems.append("evaluation.every must be >= 0 and evaluation.split eval or train")
    if cfg.mode not in MODES:
        problems.append(f"mode={cfg.mode!r}: expected one of {MODES}")
    per_round = cfg.cluster.num_actors * g.groups_per_batch
    if cfg.mode == "sync" and lr.batch_groups % per_round:
        problems.append(
            f"mode=sync needs learner.batch_groups ({lr.batch_groups}) to be a multiple of "
            f"cluster.num_actors × generator.groups_per_batch ({per_round})"
        )
    if cfg.cluster.placement not in PLACEMENTS:
        problems.append(
            f"cluster.placement={cfg.cluster.placement!r}: expected one of {PLACEMENTS}"
        )
    if cfg.cluster.actor_gpus < 0:
        problems.append("cluster.actor_gpus must be >= 0")
    if cfg.cluster.num_actors < 0 or (cfg.cluster.num_actors == 0 and r.preload is None):
        problems.append("cluster.num_actors must be >= 1 (0 only with replay.preload: offline)")
    if r.curve_secret_key is None and (
        r.curve_authorized_keys or r.curve_client_key or r.curve_learner_key
    ):
        problems.append(
            "replay.curve_authorized_keys / curve_client_key / curve_learner_key need "
            "replay.curve_secret_key"
        )
    if r.curve_authorized_keys is not None and r.curve_client_key is None:
        problems.append(
            "replay.curve_authorized_keys needs replay.curve_client_key (a certificate whose "
            "public half is in that directory)"
        )
    if r.preload is not None and cfg.cluster.num_actors != 0:
        problems.append(
            "replay.preload needs cluster.num_actors=0: preloaded groups count against the "
            "actors' admission, so actors running beside a preload would wait"
        )
    if r.preload is not None and (r.max_staleness is not None or r.samples_per_insert):
        problems.append(
            "replay.preload needs replay.max_staleness=null and no rate limiter "
            "(samples_per_insert=null): stored groups are older than any version of this "
            "learner, and nothing is inserted while training"
        )
    try:
        narrowed = r.preload_filter().narrows
    except ValueError as e:
        problems.append(f"replay.preload_*: {e}")
        narrowed = True
    if r.preload is None and narrowed:
        problems.append("replay.preload_* filters need replay.preload (a stored run)")
    if cfg.cluster.num_actors == 0 and (cfg.mode == "sync" or cfg.evaluation.every):
        problems.append("cluster.num_actors=0 (offline) needs mode=async and evaluation.every=0")
    if cfg.model.path is not None and not cfg.cluster.address:  # on a cluster: the nodes' disks
        from flowrl_async.model import ModelError, check_model_dir

        try:
            check_model_dir(cfg.model.path)
        except ModelError as e:
            problems.append(f"model.path: {e}")
    if problems:
        raise ValueError("invalid configuration:\n  - " + "\n  - ".join(problems))


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
