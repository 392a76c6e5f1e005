"""The cross-field rules of a training config that types alone cannot express."""

from __future__ import annotations

import math

from moe_lm.config.schema import ExpertConfig, ModelConfig, TrainConfig
from moe_lm.errors import ConfigError


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
    check_layer_sharing(m)
    _check(m.share_layers == 1 or p.pp == 1,
           f"model.share_layers={m.share_layers} with parallel.pp={p.pp}: pipeline stages split "
           "distinct blocks, and a shared block is applied across a group of layers; train a "
           "shared model with parallel.pp=1 (FSDP, EP and TP do apply) or set model.share_layers=1.")
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
    _check(pl.search in ("none", "fewest", "fastest") and pl.search_gpus >= 0
           and pl.search_top >= 1, f"plan.search={pl.search!r} (none, fewest or fastest), "
           f"plan.search_gpus={pl.search_gpus} (>= 0) and plan.search_top={pl.search_top} (>= 1).")
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


def check_layer_sharing(m: ModelConfig) -> None:
    """model.share_layers: groups of N consecutive layers share one block, so N divides n_layers
    and the layers of a group are all dense or all MoE (one block cannot be both)."""
    N, L = m.share_layers, m.n_layers
    _check(N >= 1 and L % N == 0,
           f"model.share_layers={N} must be a divisor of model.n_layers={L} (each group of "
           f"share_layers consecutive layers is one block applied share_layers times): choose one "
           f"of {[d for d in range(1, L + 1) if L % d == 0]} (1 = no sharing).")
    if N == 1:
        return
    all_dense = m.n_dense_layers >= L
    _check(all_dense or m.n_dense_layers % N == 0,
           f"model.share_layers={N} with model.n_dense_layers={m.n_dense_layers}: a shared group "
           "would hold dense and MoE layers, which one block cannot be; make n_dense_layers a "
           f"multiple of {N} (e.g. {N * (m.n_dense_layers // N)} or "
           f"{N * (m.n_dense_layers // N + 1)}).")
    _check(all_dense or m.moe_every == 1,
           f"model.share_layers={N} with model.moe_every={m.moe_every}: every shared group of "
           f"{N} consecutive layers would hold dense and MoE layers, which one block cannot be; "
           "set model.moe_every=1 or model.share_layers=1.")


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
