"""Layout search (`plan.search`): which (pp, schedule, tp, ep, dp_shard) runs the model on the
fewest GPUs, or fastest at `plan.search_gpus`, keeping the global batch.

Every candidate keeps the config's global batch (data.batch_size x trainer.grad_accum x
data-parallel ranks sequences per step) and its microbatch (the sequences one forward runs):
with pp = 1 a data-parallel rank accumulates its share in `grad_accum` micro-steps; with pp > 1
the same share is one pipeline step of that many microbatches (more microbatches, a smaller
bubble). Candidates are first ranked by a screen, then measured, best first, with the real code
(`stage_memory.layout_memory`) until `plan.search_top` fit (at most 3 x as many measured), one
row per (pp, schedule, tp), its best ep x dp_shard; only measured rows are printed.

The screen is analytic and only orders the measurements: the state (16 bytes per parameter: fp32
weight, gradient and two AdamW moments) of the parameters the rank holds, split as
`moe_lm.parallel` splits them (experts over ep x dp_shard, replicated over tp; attention, dense
MLPs and shared experts over tp x dp_shard x ep; the rest over dp_shard x ep), plus the base
plan's measured activations scaled by the layer-microbatches the rank holds (from torch's
schedule) and by 1 / tp (sequence parallel), and its FSDP all-gather buffers scaled by 1 / ep
(a MoE block gathers its rank's experts; 1 / tp for a dense model). Step time is the model
FLOPs at `plan.peak_tflops` x `plan.mfu` times the schedule's bubble factor (`schedules.step_time_factor`); tp and all-to-all
communication are inside the assumed MFU, so at one GPU count layouts differ by the bubble.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from moe_lm.config import TrainConfig
from moe_lm.errors import ConfigError
from moe_lm.parallel.pipeline import (SCHEDULES, check_pipeline_run, split_layers,
                                      stage_indices, stages_per_rank)
from moe_lm.parallel.tensor_parallel import check_tensor_parallel
from moe_lm.planning.counting import build_meta_model, component_of
from moe_lm.planning.memory import RankMemory, world_size_of
from moe_lm.planning.schedules import held_microbatches, step_time_factor
from moe_lm.planning.stage_memory import layout_memory, microbatch_size

GIB = 2 ** 30
STATE_BYTES = 16
_TP_SPLIT = ("attention", "dense_mlp", "shared_experts")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two(limit: int) -> list[int]:
    out, v = [], 1
    while v <= limit:
        out.append(v)
        v *= 2
    return out


def global_batch(cfg: TrainConfig) -> tuple[int, int]:
    """(sequences per optimizer step, sequences per microbatch) of `cfg`."""
    p = cfg.parallel
    dp = p.dp_replicate * p.dp_shard * p.ep
    micro = microbatch_size(cfg) if p.pp > 1 else cfg.data.batch_size
    return cfg.data.batch_size * cfg.trainer.grad_accum * dp, micro


def layout(cfg: TrainConfig, pp: int, schedule: str, tp: int, ep: int, dp_shard: int,
           seqs: int, micro: int) -> TrainConfig | None:
    """`cfg` on this layout at `seqs` sequences per step in microbatches of `micro`, or None
    when the layout cannot run it."""
    dp = cfg.parallel.dp_replicate * dp_shard * ep
    if seqs % (dp * micro):
        return None
    n_micro = seqs // (dp * micro)
    par = replace(cfg.parallel, pp=pp, pp_schedule=schedule, tp=tp, ep=ep, dp_shard=dp_shard,
                  pp_layers=None, pp_microbatches=n_micro if pp > 1 else 0)
    if pp > 1:
        data, trainer = replace(cfg.data, batch_size=micro * n_micro), replace(cfg.trainer,
                                                                              grad_accum=1)
    else:
        data, trainer = replace(cfg.data, batch_size=micro), replace(cfg.trainer,
                                                                     grad_accum=n_micro)
    out = replace(cfg, parallel=par, data=data, trainer=trainer)
    try:
        check_tensor_parallel(out)
        if cfg.expert.num_experts % ep:
            return None
        if pp > 1 and tp > 1:  # the Trainer refuses pp x tp (moe_lm.parallel.mesh)
            return None
        check_pipeline_run(out)  # only what the Trainer runs: its schedules, microbatches
        if pp > 1:
            held_microbatches(schedule, pp, n_micro)  # torch refuses some (m, pp) pairs
    except (ConfigError, ValueError):
        return None
    return out


def _layer_state(cfg: TrainConfig) -> tuple[dict[int, dict[str, int]], dict[str, int]]:
    """Parameters by component: per block index, and outside the blocks."""
    blocks: dict[int, dict[str, int]] = {}
    rest: dict[str, int] = {}
    for name, param in build_meta_model(cfg).named_parameters():
        comp = component_of(name)
        table = blocks.setdefault(int(name.split(".")[1]), {}) if name.startswith(
            "layers.") else rest
        table[comp] = table.get(comp, 0) + param.numel()
    return blocks, rest


def _split(comp: str, n: int, p) -> float:
    if comp == "experts":
        return n / (p.ep * p.dp_shard)
    if comp in _TP_SPLIT:
        return n / (p.tp * p.dp_shard * p.ep)
    return n / (p.dp_shard * p.ep)


def screen(cfg: TrainConfig, counts, base_cfg: TrainConfig, base: RankMemory) -> float:
    """The screen's bytes for the busiest rank of `cfg` (see the module docstring)."""
    p = cfg.parallel
    blocks, rest = counts
    n_stages = p.pp * stages_per_rank(p.pp_schedule)
    ranges = split_layers(cfg.model.n_layers, n_stages, None)
    base_state = sum(base.parts[k] for k in ("parameters", "gradients", "optimizer_states"))
    fsdp = base.parts["fsdp_unsharded"]  # one block's all-gathered weights: experts / ep
    bp = base_cfg.parallel
    fsdp *= bp.ep / p.ep if cfg.expert.num_experts > 1 else bp.tp / p.tp
    base_rest = ((base.peak - base_state - base.parts["fsdp_unsharded"])
                 / base_cfg.model.n_layers * bp.tp)
    held = held_microbatches(p.pp_schedule, p.pp, p.pp_microbatches) if p.pp > 1 else {
        0: [(0, {0: 1})]}
    worst = 0.0
    for rank in range(p.pp):
        ids = stage_indices(rank, p.pp, p.pp_schedule) if p.pp > 1 else [0]
        state = 0.0
        for s in ids:
            for i in ranges[s]:
                state += sum(_split(c, n, p) for c, n in blocks[i].items())
            if s == 0:
                state += _split("embedding", rest.get("embedding", 0), p)
            if s == n_stages - 1:
                state += sum(_split(c, n, p) for c, n in rest.items() if c != "embedding")
        layer_mbs = max(sum(n * len(ranges[s]) for s, n in c.items()) for _, c in held[rank])
        worst = max(worst, state * STATE_BYTES + base_rest * layer_mbs / p.tp + fsdp)
    return worst


def candidates(cfg: TrainConfig, gpus: int | None) -> list[TrainConfig]:
    """Every layout at the config's global batch (at `gpus` GPUs when given)."""
    seqs, micro = global_batch(cfg)
    m, e = cfg.model, cfg.expert
    out = []
    for pp in _powers_of_two(m.n_layers):
        for schedule in (SCHEDULES if pp > 1 else ("1F1B",)):
            for tp in _powers_of_two(cfg.plan.gpus_per_node):
                for ep in _divisors(e.num_experts):
                    for dp_shard in _powers_of_two(seqs) if gpus is None else [
                            gpus // (pp * tp * ep * cfg.parallel.dp_replicate)]:
                        n = pp * tp * ep * dp_shard * cfg.parallel.dp_replicate
                        if dp_shard < 1 or (gpus is not None and n != gpus):
                            continue
                        c = layout(cfg, pp, schedule, tp, ep, dp_shard, seqs, micro)
                        if c is not None:
                            out.append(c)
    return out


def search_layouts(cfg: TrainConfig, base: RankMemory, capacity: int, ideal_step_s: float,
                   device_type: str) -> dict[str, Any]:
    """The `plan.search` table: the best `plan.search_top` measured layouts that fit."""
    mode, top = cfg.plan.search, cfg.plan.search_top
    max_measured = 3 * top
    gpus = None if mode == "fewest" else (cfg.plan.search_gpus or world_size_of(cfg))
    counts = _layer_state(cfg)
    rows = []
    for c in candidates(cfg, gpus):
        p = c.parallel
        factor = step_time_factor(p.pp_schedule, p.pp, p.pp_microbatches)
        rows.append((c, screen(c, counts, cfg, base), factor))
    fitting = [r for r in rows if r[1] <= capacity]
    if mode == "fewest":
        fitting.sort(key=lambda r: (world_size_of(r[0]), r[2], r[1]))
    else:
        fitting.sort(key=lambda r: (r[2], r[1]))
    measured, tried, shown, over = [], 0, set(), []
    for c, est, factor in fitting:
        if len(measured) >= top or tried >= max_measured:
            break
        group = (c.parallel.pp, c.parallel.pp_schedule, c.parallel.tp)
        if group in shown:  # one row per (pp, schedule, tp): the alternatives differ in kind
            continue
        tried += 1
        try:
            mem = layout_memory(c, device_type)
        except ConfigError:
            continue
        r = row(c, mem, est, factor, ideal_step_s, world_size_of(cfg))
        shown.add(group)  # its lowest screened split measured: give the next kind its turn
        if mem.peak <= capacity:
            measured.append(r)
        else:
            over.append(r)  # passed the screen, but measured over: shown as the alternative
    over_rows = sorted(over, key=lambda r: r["peak_bytes"])[:top]
    return {"mode": mode, "gpus": gpus, "candidates": len(rows), "screened_fit": len(fitting),
            "measured": tried, "rows": measured, "over_rows": over_rows}


def row(c: TrainConfig, mem: RankMemory, est: float, factor: float, ideal_step_s: float,
        base_world: int) -> dict[str, Any]:
    p = c.parallel
    world = world_size_of(c)
    step = ideal_step_s * base_world / world * factor  # same tokens per step
    return {"gpus": world, "pp": p.pp, "schedule": p.pp_schedule if p.pp > 1 else "-",
            "microbatches": p.pp_microbatches if p.pp > 1 else c.trainer.grad_accum,
            "tp": p.tp, "ep": p.ep, "dp_shard": p.dp_shard, "dp_replicate": p.dp_replicate,
            "peak_bytes": mem.peak, "screen_bytes": int(est),
            "peak_pp_rank": mem.peak_pp_rank if p.pp > 1 else None,
            "bubble": 1 - 1 / factor, "step_time_s": step,
            "time_to_train_s": step * c.trainer.max_steps}


def format_search(result: dict[str, Any]) -> str:
    """The table `python -m moe_lm.plan plan.search=...` prints."""
    what = ("fewest GPUs" if result["mode"] == "fewest"
            else f"fastest step at {result['gpus']} GPUs")
    lines = [f"layout search ({what}, same global batch): {result['candidates']} layouts, "
             f"{result['screened_fit']} pass the screen, {result['measured']} measured",
             f"{'#':>2} {'GPUs':>5} {'pp':>3} {'schedule':<22}{'mb':>4} {'tp':>3} {'ep':>3} "
             f"{'dp_sh':>5} {'peak GiB':>9} {'@pp rank':>8} {'bubble':>7} {'step s':>7} "
             f"{'days':>6}"]
    for i, r in enumerate(result["rows"], 1):
        lines.append(_format_row(str(i), r))
    if result.get("over_rows"):
        lines.append("measured, but over the usable memory (the screen's best split of each pp, "
                     "schedule, tp):")
        lines += [_format_row("x", r) for r in result["over_rows"]]
    if not result["rows"]:
        lines.append("  no measured layout fits: lower data.batch_size or data.seq_len, or use "
                     "trainer.activation_checkpointing=full")
    return "\n".join(lines)


def _format_row(label: str, r: dict[str, Any]) -> str:
    at = "-" if r["peak_pp_rank"] is None else str(r["peak_pp_rank"])
    return (f"{label:>2} {r['gpus']:>5} {r['pp']:>3} {r['schedule']:<22}{r['microbatches']:>4} "
            f"{r['tp']:>3} {r['ep']:>3} {r['dp_shard']:>5} {r['peak_bytes'] / GIB:>9.2f} "
            f"{at:>8} {100 * r['bubble']:>6.1f}% {r['step_time_s']:>7.2f} "
            f"{r['time_to_train_s'] / 86400:>6.1f}")

