"""The dataclass schemas that Hydra validates YAML and CLI overrides against (one per group)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


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
    # cross-layer sharing (ALBERT / MoEUT): each group of `share_layers` consecutive layers is one
    # block applied that many times (n_layers / share_layers distinct blocks); 1 = no sharing
    share_layers: int = 1
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
    """Device mesh: pipeline, FSDP sharding, expert parallel, replicated data parallel and tensor
    parallel degrees."""

    dp_shard: int = 1
    ep: int = 1
    dp_replicate: int = 1
    tp: int = 1  # tensor parallel degree (attention, dense MLPs, shared experts; sequence parallel)
    pp: int = 1  # pipeline ranks (moe_lm.parallel.pipeline, outermost mesh dim)
    # 1F1B | Interleaved1F1B | InterleavedZeroBubble | ZBVZeroBubble (torch's schedules)
    pp_schedule: str = "1F1B"
    pp_microbatches: int = 0  # microbatches per step under pp (0: one per trainer.grad_accum)
    pp_layers: Optional[List[int]] = None  # blocks per stage (None: an even split)


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
    # layout search over (pp, tp, ep, dp_shard) at the same global batch (moe_lm.planning.search):
    search: str = "none"  # none | fewest (fewest GPUs that fit) | fastest (at search_gpus)
    search_gpus: int = 0  # the GPU count of `fastest` (0: the config's world size)
    search_top: int = 5  # alternatives measured and printed


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
