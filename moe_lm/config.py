"""Typed configuration: the dataclass schemas that Hydra validates YAML and CLI overrides against.

Hydra composes `conf/` against these schemas (unknown keys and wrong types fail at compose time);
`to_train_config` turns the composed DictConfig into plain dataclasses once, and `validate` checks
the cross-field rules that types alone cannot express. Below the entry point no code sees Hydra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moe_lm.errors import ConfigError
from moe_lm.start_time import agreed_start_time


@dataclass
class ModelConfig:
    """Transformer shape. `vocab_size=0` takes the tokenizer's vocabulary size."""

    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_hidden: int = 768  # hidden size of the dense SwiGLU MLPs
    n_dense_layers: int = 1  # the first layers use a dense MLP
    moe_every: int = 1  # after those, every `moe_every`-th layer is MoE (1 = all)
    vocab_size: int = 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    # Switches for imported architectures (moe_lm.import_hf); the defaults are moe_lm's own model.
    head_dim: int = 0  # query/key/value head width; 0 = d_model / n_heads (Qwen3-MoE sets it)
    qk_norm: str = "none"  # none | head (RMSNorm per head: Qwen3-MoE) | proj (whole q/k: OLMoE)
    clip_qkv: float = 0.0  # > 0: clamp q, k, v to [-clip_qkv, clip_qkv] (OLMoE's clip_qkv)

    @property
    def head_width(self) -> int:
        """The attention head width: `head_dim`, or d_model / n_heads when it is 0."""
        return self.head_dim or self.d_model // self.n_heads


@dataclass
class ExpertConfig:
    """The MoE layer: router, experts and the backend that runs them."""

    num_experts: int = 8
    top_k: int = 2
    hidden_size: int = 512  # each expert's SwiGLU hidden size (fine-grained experts: small)
    capacity_factor: float = 0.0  # 0 = dropless; else overflow tokens skip the experts
    num_shared: int = 0  # shared experts every token goes through
    backend: str = "torch"  # torch | triton | megablocks
    router: str = "softmax"  # softmax | sigmoid | expert_choice | group_limited
    jitter: float = 0.0  # multiplicative router input noise in training (Switch)
    bias_update_rate: float = 0.0  # > 0 enables aux-loss-free balancing (DeepSeek-V3)
    num_groups: int = 1  # group_limited: experts split into this many groups (nodes)
    topk_groups: int = 1  # group_limited: groups each token may route to
    norm_topk_prob: bool = True  # softmax router: renormalise the k weights (False: OLMoE, Qwen3-MoE)


@dataclass
class LossConfig:
    """Coefficients of the terms added to the LM loss."""

    aux_coef: float = 0.01  # load-balancing loss
    aux_type: str = "switch"  # switch (per batch) | sequence (per sequence)
    z_coef: float = 0.001  # router z-loss
    distill_coef: float = 0.0  # > 0: add T^2 * KL(teacher || student) (knowledge distillation)
    distill_teacher: Optional[str] = None  # the teacher: a run directory or checkpoint directory
    distill_temperature: float = 2.0  # T, softens both distributions
    mtp_coef: float = 0.0  # > 0: add the multi-token prediction loss with this weight
    mtp_depth: int = 1  # extra future tokens predicted (one MTP module each)


@dataclass
class ParallelConfig:
    """Device mesh: FSDP sharding, expert parallel and replicated data parallel degrees."""

    dp_shard: int = 1
    ep: int = 1
    dp_replicate: int = 1


@dataclass
class SourceConfig:
    """One source of a weighted mixture: its name (for `val/<name>/loss`), files and weight."""

    name: str = ""
    path: Optional[str] = None  # None: the built-in corpus
    weight: float = 1.0


@dataclass
class DataConfig:
    """Where the tokens come from. `path=None` uses the built-in corpus (CPython's own text);
    `sources` (a list of {name, path, weight}) mixes several, each prepared separately."""

    path: Optional[str] = None
    seq_len: int = 128
    batch_size: int = 8  # sequences per rank per micro-step
    tokenizer: str = "cl100k_base"
    val_fraction: float = 0.02
    corpus_mb: float = 6.0  # how much of the built-in corpus to use
    cache_dir: str = "~/.cache/moe_lm"
    chunk_mb: float = 32.0  # the prepare step's unit of work (and of the validation split)
    sources: list[SourceConfig] = field(default_factory=list)


@dataclass
class PrepareConfig:
    """How `python -m moe_lm.prepare` runs: datatrove's local or SLURM executor."""

    workers: int = 1  # tasks run at once (local executor)
    executor: str = "local"  # local | slurm
    tasks: int = 0  # 0: one task per chunk
    logging_dir: Optional[str] = None  # datatrove's logs; None: <cache_dir>/prepare_logs/<name>
    slurm_partition: Optional[str] = None
    slurm_time: str = "04:00:00"
    slurm_cpus_per_task: int = 1
    slurm_mem_per_cpu_gb: int = 2
    slurm_job_name: str = "moe_lm_prepare"


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay to `min_lr_ratio * lr`."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: Optional[float] = 1.0  # max global grad norm; null: no clipping (norm still logged)


@dataclass
class RoutingMonitorConfig:
    """The dead-expert / collapse detector (checked at each log) and the expert-load heatmaps."""

    dead_frac: float = 0.1  # an expert whose load stays under this fraction of the mean ...
    window: int = 50  # ... for this many steps is reported dead (console warning + wandb alert)
    collapse_entropy: float = 0.5  # a layer whose load entropy / ln(E) stays under this: collapsed
    heatmap: bool = True  # expert-load heatmap PNG (and wandb image) at each eval


@dataclass
class TrainerConfig:
    """The loop: length, cadence of logs/evals/checkpoints, device and precision."""

    max_steps: int = 400
    stop_at: Optional[int] = None  # end early at this step; the schedule stays that of max_steps
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_last: int = 2
    final_weights_only: bool = False  # a finished run keeps only its final weights (no AdamW)
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "bf16"  # bf16 | fp32
    grad_accum: int = 1
    activation_checkpointing: str = "none"  # none | full | selective
    compile: bool = False
    dry_run: bool = False
    collective_timeout_s: float = 600.0  # a collective that waits longer fails the run, clearly
    resume: str = "auto"  # auto | never | must: see moe_lm.training.resume
    resume_allow_changes: list[str] = field(default_factory=list)  # changed keys accepted on resume
    monitor: RoutingMonitorConfig = field(default_factory=RoutingMonitorConfig)
    # lm-eval tasks run at each eval (needs the [eval] extra), logged as eval/<task>/<metric>
    eval_tasks: list[str] = field(default_factory=list)
    eval_tasks_limit: int = 0  # documents per task (0: all of them)
    eval_tasks_num_fewshot: Optional[int] = None  # None: each task's own
    eval_tasks_include_path: Optional[str] = None  # a directory of task YAMLs (local files)


@dataclass
class WandbConfig:
    """wandb run settings; `mode=disabled` turns it off, `offline` needs no login."""

    mode: str = "offline"  # online | offline | disabled
    project: str = "moe_lm"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class PlanConfig:
    """What `python -m moe_lm.plan` plans for: the target accelerator and throughput assumptions."""

    device: str = "cuda"  # the device type the run will use (cuda | cpu)
    gpu_memory_gb: float = 80.0  # memory of one accelerator (H100 SXM: 80 GB)
    memory_headroom: float = 0.1  # share kept free (CUDA context, NCCL, fragmentation)
    peak_tflops: float = 989.0  # dense bf16 peak of one accelerator (H100 SXM: 989 TFLOP/s)
    mfu: float = 0.4  # model FLOPs utilisation assumed for step time and time-to-train
    gpus_per_node: int = 8  # for the launch command (torchrun --nproc_per_node)


@dataclass
class InitConfig:
    """Where a new run's weights come from: random (moe_lm's init) or an existing checkpoint."""

    # a run directory or checkpoints/step_N (e.g. one written by moe_lm.import_hf): the new run
    # starts from its weights, model shape, routing and tokenizer, with a fresh optimizer and schedule
    from_checkpoint: Optional[str] = None


@dataclass
class TrainConfig:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    init: InitConfig = field(default_factory=InitConfig)


GROUP_SCHEMAS = {
    "model": ModelConfig,
    "expert": ExpertConfig,
    "loss": LossConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "trainer": TrainerConfig,
    "logger": LoggerConfig,
    "plan": PlanConfig,
}


def register_configs() -> None:
    """Registers the root schema so that every composed config is checked against TrainConfig."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("run_start"):  # the default run dir: one per torchrun job
        OmegaConf.register_new_resolver("run_start", _run_start, use_cache=True)
    if not OmegaConf.has_resolver("run_kind"):  # plans and dry runs: outputs/plans/...
        OmegaConf.register_new_resolver("run_kind", run_kind)


def run_kind(job_name: str, dry_run: Any) -> str:
    """`${run_kind:${hydra.job.name},${trainer.dry_run}}`: `plans/` for plans and dry runs, ''
    for training runs, so that they do not mix with real runs in `outputs/`."""
    return "plans/" if job_name == "plan" or str(dry_run).lower() == "true" else ""


def _run_start(pattern: str) -> str:
    """`${run_start:%H-%M-%S}`: like Hydra's `${now:...}`, but every rank of a torchrun job
    resolves the same start time, so all ranks share one run directory."""
    return agreed_start_time().strftime(pattern)


def to_train_config(cfg: DictConfig | dict[str, Any]) -> TrainConfig:
    """Turns a composed config (DictConfig or plain dict) into validated dataclasses."""
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), _without_hydra(cfg))
    out: TrainConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(out)
    return out


def _without_hydra(cfg: Any) -> Any:
    """The job's keys, resolved; the `hydra` node is dropped before resolving (its runtime
    interpolations only resolve inside a running Hydra app)."""
    if isinstance(cfg, DictConfig):
        return {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig)
                else cfg[k] for k in cfg if k != "hydra"}
    return {k: v for k, v in cfg.items() if k != "hydra"}


def validate(cfg: TrainConfig) -> None:
    """Checks the rules that span fields; raises ConfigError saying what to change."""
    m, e, t, d, p = cfg.model, cfg.expert, cfg.trainer, cfg.data, cfg.parallel
    _check(e.num_experts >= 1, f"expert.num_experts={e.num_experts}: set it to 1 or more.")
    _check(
        1 <= e.top_k <= e.num_experts,
        f"expert.top_k={e.top_k} must be between 1 and expert.num_experts={e.num_experts}: "
        "lower expert.top_k or raise expert.num_experts.",
    )
    _check(e.capacity_factor >= 0, "expert.capacity_factor must be >= 0 (0 means dropless).")
    _check(e.backend in ("torch", "triton", "megablocks"),
           f"expert.backend={e.backend!r}: choose torch, triton or megablocks.")
    _check(e.router in ("softmax", "sigmoid", "expert_choice", "group_limited"),
           f"expert.router={e.router!r}: choose softmax, sigmoid, expert_choice or group_limited.")
    _check_groups(e)
    _check(e.router != "expert_choice" or e.capacity_factor > 0,
           "expert.router=expert_choice needs expert.capacity_factor > 0 (tokens per expert = "
           "capacity_factor * tokens * top_k / num_experts); set e.g. expert.capacity_factor=1.0.")
    _check(e.norm_topk_prob or e.router == "softmax",
           f"expert.norm_topk_prob=false applies to the softmax router only (expert.router="
           f"{e.router} always normalises its weights): set expert.norm_topk_prob=true.")
    _check(e.num_shared >= 0, "expert.num_shared must be >= 0.")
    _check(0 <= e.jitter < 1, f"expert.jitter={e.jitter} must lie in [0, 1) (0 = off; e.g. 0.01).")
    _check(e.bias_update_rate >= 0,
           f"expert.bias_update_rate={e.bias_update_rate} must be >= 0 (0 = off; e.g. 0.001).")
    _check(e.bias_update_rate == 0 or e.router != "expert_choice",
           "expert.bias_update_rate > 0 (aux-loss-free balancing) does not apply to "
           "expert.router=expert_choice, which is balanced by construction: set it to 0.")
    _check(cfg.loss.aux_type in ("switch", "sequence"),
           f"loss.aux_type={cfg.loss.aux_type!r}: choose switch or sequence.")
    lc = cfg.loss
    _check(lc.distill_coef >= 0 and lc.mtp_coef >= 0,
           "loss.distill_coef and loss.mtp_coef must be >= 0 (0 turns the objective off).")
    _check(lc.distill_coef == 0 or bool(lc.distill_teacher),
           "loss.distill_coef > 0 needs a teacher: set loss.distill_teacher=<run dir or checkpoint "
           "of a trained model with the same tokenizer>.")
    _check(lc.distill_temperature > 0, "loss.distill_temperature must be > 0.")
    _check(lc.mtp_depth >= 1 and lc.mtp_depth < d.seq_len,
           f"loss.mtp_depth={lc.mtp_depth} must be >= 1 and below data.seq_len={d.seq_len}.")
    _validate_sizes_and_optim(cfg)
    _check(m.head_dim > 0 or m.d_model % m.n_heads == 0,
           f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads} (or set "
           "model.head_dim).")
    _check(m.head_dim >= 0 and m.head_width % 2 == 0,
           "the head width (model.head_dim, or model.d_model / model.n_heads) must be even (rotary).")
    _check(m.qk_norm in ("none", "head", "proj"),
           f"model.qk_norm={m.qk_norm!r}: choose none, head (per-head RMSNorm, Qwen3-MoE) or proj "
           "(RMSNorm over the whole query and key projections, OLMoE).")
    _check(m.clip_qkv >= 0, f"model.clip_qkv={m.clip_qkv} must be >= 0 (0 = off).")
    _check(m.n_heads % m.n_kv_heads == 0,
           f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads}.")
    _check(m.n_layers >= 1 and m.moe_every >= 1 and 0 <= m.n_dense_layers <= m.n_layers,
           "model.n_layers >= 1, model.moe_every >= 1 and 0 <= model.n_dense_layers <= n_layers.")
    _check(t.max_steps >= 1, "trainer.max_steps must be >= 1.")
    _check(t.stop_at is None or 1 <= t.stop_at <= t.max_steps,
           f"trainer.stop_at={t.stop_at} must lie between 1 and trainer.max_steps={t.max_steps}.")
    _check(t.grad_accum >= 1, "trainer.grad_accum must be >= 1.")
    _check(min(t.log_every, t.eval_every, t.ckpt_every, t.keep_last, t.eval_batches) >= 1,
           "trainer.log_every, eval_every, ckpt_every, keep_last and eval_batches must be >= 1.")
    _check(t.device in ("auto", "cpu", "cuda"), f"trainer.device={t.device!r}: auto, cpu or cuda.")
    _check(t.eval_tasks_limit >= 0 and (t.eval_tasks_num_fewshot or 0) >= 0,
           "trainer.eval_tasks_limit (0 = every document) and eval_tasks_num_fewshot must be >= 0.")
    _check(0 <= t.monitor.dead_frac < 1 and 0 <= t.monitor.collapse_entropy < 1
           and t.monitor.window >= 1,
           "trainer.monitor.dead_frac and collapse_entropy must lie in [0, 1) (0 turns a check "
           "off) and trainer.monitor.window must be >= 1 step.")
    _check(t.precision in ("bf16", "fp32"), f"trainer.precision={t.precision!r}: bf16 or fp32.")
    _check(t.activation_checkpointing in ("none", "full", "selective"),
           "trainer.activation_checkpointing: none, full or selective.")
    _check(d.seq_len >= 2 and d.batch_size >= 1, "data.seq_len >= 2 and data.batch_size >= 1.")
    _check(0 < d.val_fraction < 0.5, "data.val_fraction must lie in (0, 0.5).")
    _check(min(p.dp_shard, p.ep, p.dp_replicate) >= 1, "parallel degrees must be >= 1.")
    _check(t.collective_timeout_s > 0, "trainer.collective_timeout_s must be > 0 (seconds).")
    _check(e.num_experts % p.ep == 0,
           f"expert.num_experts={e.num_experts} is not divisible by parallel.ep={p.ep}: "
           "choose an EP degree that divides the number of experts.")
    pl = cfg.plan
    _check(pl.device in ("cuda", "cpu"), f"plan.device={pl.device!r}: cuda or cpu.")
    _check(pl.gpu_memory_gb > 0 and pl.peak_tflops > 0 and pl.gpus_per_node >= 1,
           "plan.gpu_memory_gb, plan.peak_tflops and plan.gpus_per_node must be > 0.")
    _check(0 < pl.mfu <= 1 and 0 <= pl.memory_headroom < 1,
           f"plan.mfu={pl.mfu} must lie in (0, 1] and plan.memory_headroom="
           f"{pl.memory_headroom} in [0, 1).")
    _check(cfg.logger.wandb.mode in ("online", "offline", "disabled"),
           "logger.wandb.mode: online, offline or disabled.")


def _validate_sizes_and_optim(cfg: TrainConfig) -> None:
    """Values that would train wrongly without a word (gradient ascent, zeroed gradients) or fail
    deep inside torch (zero-sized layers)."""
    m, e, o, t = cfg.model, cfg.expert, cfg.optim, cfg.trainer
    sizes = {"model.d_model": m.d_model, "model.n_heads": m.n_heads,
             "model.n_kv_heads": m.n_kv_heads, "model.ffn_hidden": m.ffn_hidden,
             "expert.hidden_size": e.hidden_size}
    bad = [f"{k}={v}" for k, v in sizes.items() if v < 1]
    _check(not bad, f"{', '.join(bad)}: model sizes must be >= 1.")
    _check(o.lr > 0 and math.isfinite(o.lr),
           f"optim.lr={o.lr} must be a positive number (e.g. 3e-3); a negative one ascends.")
    _check(o.grad_clip is None or (o.grad_clip > 0 and math.isfinite(o.grad_clip)),
           f"optim.grad_clip={o.grad_clip} must be > 0 (the max gradient norm, e.g. 1.0), or "
           "optim.grad_clip=null to turn clipping off; 0 would zero every gradient and a negative "
           "value would flip them.")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0 (0: none).")
    _check(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must lie in [0, 1].")
    _check(o.weight_decay >= 0 and o.eps > 0 and 0 <= o.beta1 < 1 and 0 <= o.beta2 < 1,
           "optim.weight_decay >= 0, optim.eps > 0 and optim.beta1, optim.beta2 in [0, 1).")
    _check(t.resume in ("auto", "never", "must"),
           f"trainer.resume={t.resume!r}: auto (resume if possible), never (start fresh; the old "
           "checkpoints are moved aside) or must (fail without a checkpoint).")


def _check_groups(e: ExpertConfig) -> None:
    """expert.num_groups / topk_groups: group-limited routing only, and a selection that exists."""
    if e.router != "group_limited":
        _check(e.num_groups == 1 and e.topk_groups == 1,
               f"expert.num_groups={e.num_groups} and expert.topk_groups={e.topk_groups} apply to "
               "expert.router=group_limited only: set expert.router=group_limited (e.g. "
               "expert=group_limited) or leave both at 1.")
        return
    G, g, E = e.num_groups, e.topk_groups, e.num_experts
    _check(G >= 1 and E % G == 0 and E // G >= 2,
           f"expert.num_groups={G} must divide expert.num_experts={E} into groups of at least 2 "
           "experts (a group scores the sum of its top-2 experts): choose a divisor of "
           f"num_experts up to {E // 2}.")
    _check(1 <= g <= G, f"expert.topk_groups={g} must lie between 1 and expert.num_groups={G}.")
    _check(e.top_k <= g * (E // G),
           f"expert.top_k={e.top_k} exceeds the {g * (E // G)} experts of expert.topk_groups={g} "
           f"groups of {E // G}: raise expert.topk_groups or lower expert.top_k.")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
