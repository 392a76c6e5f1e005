"""The plan of a run: what it is (parameters, FLOPs), what each GPU holds, how many GPUs it needs
and how long it takes. `make_plan` returns a JSON-able dict; `format_plan` renders it as a table.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from moe_lm.config import TrainConfig
from moe_lm.errors import ConfigError, MoeLMError
from moe_lm.model import count_params
from moe_lm.parallel.fsdp import expert_shard_dim
from moe_lm.parallel.pipeline import step_microbatches
from moe_lm.planning.counting import (
    build_meta_model,
    count_by_component,
    flops_per_token,
    layer_counts,
    totals,
)
from moe_lm.planning.memory import PARTS, RankMemory, world_size_of
from moe_lm.planning.prepare_time import prepare_estimate
from moe_lm.planning.schedules import bubble_share, step_time_factor
from moe_lm.planning.search import format_search, search_layouts
from moe_lm.planning.stage_memory import layout_memory

GIB = 2 ** 30


def gpu_capacity_bytes(cfg: TrainConfig) -> int:
    """Bytes of one GPU the run may use: plan.gpu_memory_gb GiB less the headroom."""
    return int(cfg.plan.gpu_memory_gb * GIB * (1.0 - cfg.plan.memory_headroom))


def _valid_dp_shard(cfg: TrainConfig, s: int) -> bool:
    """FSDP can shard the expert weights over `s` (one inner dim divides evenly)."""
    if cfg.parallel.ep == 1:
        return True
    shape = (cfg.expert.num_experts, cfg.model.d_model, cfg.expert.hidden_size)
    try:
        expert_shard_dim(shape, s)
    except ConfigError:
        return False
    return True


def with_dp_shard(cfg: TrainConfig, s: int) -> TrainConfig:
    return replace(cfg, parallel=replace(cfg.parallel, dp_shard=s))


def min_gpus(cfg: TrainConfig, mem: RankMemory, device_type: str,
             max_tries: int = 4) -> dict[str, Any]:
    """The fewest GPUs of `plan.gpu_memory_gb` that hold one rank's peak, keeping `parallel.ep`,
    `parallel.dp_replicate`, `parallel.tp`, `parallel.pp` and the per-GPU batch, and changing
    `parallel.dp_shard` (`plan.search=fewest` also changes the other degrees).

    Parameters, gradients and optimizer states are sharded over dp_shard (every weight is); the
    activations and FSDP's unsharded buffers are not. That split of the measured peak gives the
    first candidate; each candidate is then measured with the real code, growing dp_shard until
    the measured peak fits.
    """
    capacity = gpu_capacity_bytes(cfg)
    p = cfg.parallel
    state = sum(mem.parts[k] for k in ("parameters", "gradients", "optimizer_states"))
    rest = mem.peak - state
    if rest >= capacity:
        return {"gpus": None, "dp_shard": None, "reason": (
            f"activations and buffers alone take {rest / GIB:.1f} GiB per GPU, more than the "
            f"{capacity / GIB:.1f} GiB usable: lower data.batch_size or data.seq_len, or use "
            "trainer.activation_checkpointing=full")}
    s = max(1, math.ceil(state * p.dp_shard / (capacity - rest)))
    measured: dict[int, int] = {p.dp_shard: mem.peak}
    for _ in range(max_tries):
        while not _valid_dp_shard(cfg, s):
            s += 1
        if s not in measured:
            measured[s] = layout_memory(with_dp_shard(cfg, s), device_type).peak
        if measured[s] <= capacity:
            smaller = [k for k, v in measured.items() if v <= capacity and k < s]
            s = min(smaller + [s])
            return {"gpus": p.dp_replicate * s * p.ep * p.tp * p.pp, "dp_shard": s,
                    "peak_bytes": measured[s], "measured": {str(k): v for k, v in measured.items()}}
        s = max(s + 1, math.ceil(s * measured[s] / capacity))
    return {"gpus": None, "dp_shard": None, "measured": {str(k): v for k, v in measured.items()},
            "reason": f"no dp_shard up to {s} fits in {max_tries} measured tries"}


def make_plan(cfg: TrainConfig) -> dict[str, Any]:
    """Counts, measures and times the run of `cfg` (model.vocab_size already resolved)."""
    start = time.time()
    if cfg.model.vocab_size <= 0:
        raise MoeLMError("make_plan needs model.vocab_size resolved (the tokenizer's size).")
    model = build_meta_model(cfg)
    table = count_by_component(model, cfg.expert.top_k, cfg.expert.num_experts)
    del model
    tot = totals(table)
    closed_form = count_params(cfg.model, cfg.expert)
    if (tot["total"], tot["active"]) != (closed_form["total"], closed_form["active"]):
        raise MoeLMError(f"The meta model has {tot} parameters but moe_lm.model.count_params "
                         f"says {closed_form}: one of them is out of date with the model code.")
    flops = flops_per_token(cfg, table)
    device_type = cfg.plan.device
    mem = layout_memory(cfg, device_type)
    world = world_size_of(cfg)
    capacity = gpu_capacity_bytes(cfg)
    fewest = min_gpus(cfg, mem, device_type)
    d, t, p = cfg.data, cfg.trainer, cfg.parallel
    data_parallel = world // (p.tp * p.pp)  # tp and pp ranks work on the same sequences
    tokens_per_step = d.batch_size * d.seq_len * t.grad_accum * data_parallel
    achieved = world * cfg.plan.peak_tflops * 1e12 * cfg.plan.mfu  # FLOP/s
    ideal_step = flops["total"] * tokens_per_step / achieved
    m = step_microbatches(cfg) if p.pp > 1 else 1
    step_time = ideal_step * step_time_factor(p.pp_schedule, p.pp, m)
    search = (search_layouts(cfg, mem, capacity, ideal_step, device_type)
              if cfg.plan.search != "none" else None)
    return {
        "total_params": tot["total"],
        "active_params": tot["active"],
        "params_by_component": table,
        "layers": layer_counts(cfg),
        "flops_per_token": flops["total"],
        "flops_per_token_by_part": flops,
        "mesh": {"pp": p.pp, "dp_replicate": p.dp_replicate, "dp_shard": p.dp_shard,
                 "ep": p.ep, "tp": p.tp, "world_size": world},
        "pipeline": None if p.pp == 1 else {
            "schedule": p.pp_schedule, "microbatches": m, "bubble": bubble_share(
                p.pp_schedule, p.pp, m), "peak_pp_rank": mem.peak_pp_rank,
            "peak_stages": mem.peak_stages, "memory_per_pp_rank_bytes": mem.per_pp_rank},
        "activation_checkpointing": t.activation_checkpointing,
        "precision": t.precision,
        "memory_per_gpu_bytes": mem.peak,
        "memory_per_gpu_by_part_bytes": {**{k: mem.parts[k] for k in PARTS},
                                         "all_to_all_buffers_in_activations": mem.all_to_all},
        "gpu_memory_bytes": int(cfg.plan.gpu_memory_gb * GIB),
        "usable_gpu_memory_bytes": capacity,
        "fits": mem.peak <= capacity,
        "min_gpus": fewest["gpus"],
        "min_gpus_detail": fewest,
        "tokens_per_step": tokens_per_step,
        "step_time_s": step_time,
        "layout_search": search,
        "train_tokens": tokens_per_step * t.max_steps,
        "time_to_train_s": step_time * t.max_steps,
        "prepare": prepare_estimate(cfg, tokens_per_step * t.max_steps),
        "assumptions": {
            "plan": asdict(cfg.plan),
            "routing": "balanced (every expert gets tokens*top_k/num_experts rows)",
            "flops": "model FLOPs: 6 x active matmul weights + causal attention; no AC recompute",
            "memory": "rank 0 of a fake process group running moe_lm.parallel on fake tensors; "
                      "pp: each stage so, held microbatches from torch's schedule",
            "bubble": "1F1B (m+p-1)/m, interleaved 1+(p-1)/(vm), zero-bubble: see "
                      "moe_lm/planning/schedules.py",
        },
        "plan_seconds": round(time.time() - start, 1),
    }


def _fmt_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(int(n))


def _fmt_time(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds:.2f} s"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as the table `python -m moe_lm.plan` prints."""
    lines = []
    add = lines.append
    add(f"{'component':<16}{'total':>14}{'active/token':>16}")
    for comp, row in plan["params_by_component"].items():
        if row["total"]:
            add(f"{comp:<16}{_fmt_count(row['total']):>14}{_fmt_count(row['active']):>16}")
    add(f"{'TOTAL':<16}{_fmt_count(plan['total_params']):>14}"
        f"{_fmt_count(plan['active_params']):>16}   ({plan['total_params']:,} / "
        f"{plan['active_params']:,})")
    add("")
    add(f"training FLOPs per token: {plan['flops_per_token']:.4g} "
        f"(attention {plan['flops_per_token_by_part']['attention_scores']:.3g})")
    m = plan["mesh"]
    add(f"mesh: pp {m['pp']} x dp_replicate {m['dp_replicate']} x dp_shard {m['dp_shard']} x "
        f"ep {m['ep']} x tp {m['tp']} = {m['world_size']} GPUs; activation checkpointing "
        f"{plan['activation_checkpointing']}; {plan['precision']}")
    pipe = plan["pipeline"]
    if pipe is not None:
        add(f"pipeline: {pipe['schedule']}, {pipe['microbatches']} microbatches, bubble "
            f"{100 * pipe['bubble']:.1f}%; peak on pp rank {pipe['peak_pp_rank']} (stages "
            f"{pipe['peak_stages']}); per pp rank GiB: "
            + " ".join(f"{b / GIB:.1f}" for b in pipe["memory_per_pp_rank_bytes"]))
    where = "the busiest pipeline rank's" if pipe is not None else "rank 0"
    add(f"memory per GPU at its peak ({where}, measured on fake tensors):")
    for part, nbytes in plan["memory_per_gpu_by_part_bytes"].items():
        label = "  of which all-to-all" if part.startswith("all_to_all") else part
        add(f"  {label:<24}{nbytes / GIB:>10.2f} GiB")
    verdict = "fits" if plan["fits"] else "DOES NOT FIT"
    add(f"  {'peak':<24}{plan['memory_per_gpu_bytes'] / GIB:>10.2f} GiB  of "
        f"{plan['usable_gpu_memory_bytes'] / GIB:.1f} GiB usable: {verdict}")
    fewest = plan["min_gpus_detail"]
    if fewest["gpus"] is None:
        add(f"fewest GPUs: none with this per-GPU batch ({fewest['reason']})")
    else:
        add(f"fewest GPUs of {plan['gpu_memory_bytes'] / GIB:.0f} GiB: {fewest['gpus']} "
            f"(dp_shard {fewest['dp_shard']}, peak {fewest['peak_bytes'] / GIB:.1f} GiB)")
    a = plan["assumptions"]["plan"]
    add(f"step: {plan['tokens_per_step']:,} tokens, {_fmt_time(plan['step_time_s'])} at "
        f"{a['peak_tflops']:g} TFLOP/s x MFU {a['mfu']:g}")
    add(f"time to train {plan['train_tokens'] / 1e12:.3g}T tokens: "
        f"{_fmt_time(plan['time_to_train_s'])} on {m['world_size']} GPUs")
    add(prepare_line(plan["prepare"]))
    if plan["layout_search"] is not None:
        add("")
        add(format_search(plan["layout_search"]))
    return "\n".join(lines)


def _fmt_wall(seconds: float) -> str:
    for unit, scale in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= scale:
            return f"{seconds / scale:.1f} {unit}"
    return f"{seconds:.1f} s"


def prepare_line(est: dict[str, Any]) -> str:
    """The plan's line on `python -m moe_lm.prepare` for the run's tokens."""
    s = est["sample"]
    times = ", ".join(f"{_fmt_wall(sec)} with {k[len('slurm_'):]} SLURM tasks"
                      if k.startswith("slurm_") else
                      f"{_fmt_wall(sec)} with {k} worker{'s' if k != '1' else ''}"
                      for k, sec in est["seconds"].items())
    return (f"data preparation (python -m moe_lm.prepare) of {_fmt_count(est['tokens'])} tokens "
            f"at {est['tokens_per_worker_s'] / 1e6:.2f}M tokens/s per worker (measured now: "
            f"{s['tokens']:,} {s['tokenizer']} tokens of {s['where']} in {s['cpu_s']:.2f} "
            f"CPU-s): {times}, if storage keeps up")


def write_plan(plan: dict[str, Any], run_dir: Path | str) -> Path:
    """Writes the plan as `<run dir>/plan.json` (creating the directory); returns the file."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "plan.json"
    path.write_text(json.dumps(plan, indent=2) + "\n")
    return path
