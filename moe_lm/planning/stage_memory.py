"""Per-rank memory of a pipeline-parallel layout (`parallel.pp > 1`), measured stage by stage.

A pipeline rank holds one or more stages (`moe_lm.parallel.pipeline`: an even split of the blocks
or `parallel.pp_layers`; the first stage has the embedding, the last the final norm and LM head)
and is one rank of a `dp_replicate x dp_shard x ep x tp` mesh inside its stage. Each distinct
stage is measured like `memory.measure_rank_memory` measures a whole model: the real
`StageModule` on a fake process group of the stage's mesh, parallelised by `moe_lm.parallel`
(activation checkpointing, tp, expert parallelism, FSDP2), fake tensors, balanced routing, AdamW
states from one step, then one tracked microbatch forward + backward (gradients kept: a pipeline
step accumulates them over its microbatches). It gives, per stage:

    base    bytes held before a microbatch starts (parameters, gradients, AdamW states, inputs)
    saved   bytes a finished forward keeps until its backward (saved activations, the output)
    extra   the peak of one forward + backward above base + saved (recompute, FSDP all-gathers,
            all-to-all buffers, temporaries)

The schedule then says how many microbatches each stage of a rank holds at each of its actions
(`schedules.held_microbatches`, from torch's own schedule); the rank's peak is
    sum of its stages' base + max over its actions of (sum_s held_s x saved_s + extra of the
    action's stage),
and the plan's figure is the peak over the pipeline ranks. That combination is the only analytic
step: one process cannot run the other ranks' stages, whose sends and receives pace the schedule.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, replace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker

from moe_lm.config import TrainConfig
from moe_lm.errors import ConfigError
from moe_lm.model import is_moe_layer
from moe_lm.parallel import build_mesh, parallelize
from moe_lm.parallel.pipeline import (SPLIT_BACKWARD, StageModule, check_pipeline, split_layers,
                                      stage_indices, stages_per_rank, step_microbatches,
                                      term_coefs)
from moe_lm.parallel.precision import Precision
from moe_lm.planning.balanced import use_balanced_routing
from moe_lm.planning.counting import build_meta_model
from moe_lm.planning.memory import (PARTS, RankMemory, _AllToAllBytes, _by_part, fake_world,
                                    rank_memory, world_size_of)
from moe_lm.planning.schedules import held_microbatches
from moe_lm.training.optim import build_optimizer


@dataclass
class StageMemory:
    base: int
    saved: int
    extra: int
    parts: dict[str, int]  # base by part, and the fsdp_unsharded peak
    all_to_all: int


def microbatch_size(cfg: TrainConfig) -> int:
    """Sequences per microbatch: a pipeline step splits its trainer.grad_accum x data.batch_size
    sequences per rank into the microbatches (as the Trainer does)."""
    m, rows = step_microbatches(cfg), cfg.trainer.grad_accum * cfg.data.batch_size
    if rows % m:
        raise ConfigError(f"trainer.grad_accum x data.batch_size = {rows} sequences do not split "
                          f"into parallel.pp_microbatches={m} equal microbatches: choose a "
                          "divisor.")
    return rows // m


def stage_config(cfg: TrainConfig) -> TrainConfig:
    """The config of one stage's mesh: the same dims without pp, one microbatch per step."""
    return replace(cfg, parallel=replace(cfg.parallel, pp=1, pp_layers=None),
                   data=replace(cfg.data, batch_size=microbatch_size(cfg)),
                   trainer=replace(cfg.trainer, grad_accum=2))  # gradients live across steps


def _stage_module(cfg: TrainConfig, blocks: list[int], first: bool, last: bool) -> StageModule:
    model = build_meta_model(cfg)
    n_moe = sum(b.is_moe for b in model.layers)
    return StageModule(model, blocks, first, last, term_coefs(model), n_moe)


def _inputs(stage: StageModule, B: int, S: int, dtype: torch.dtype) -> tuple:
    if stage.first:
        return (torch.zeros((B, S + 1), dtype=torch.int64),)
    return (torch.zeros((B, S, stage.cfg.d_model), dtype=dtype, requires_grad=True),
            torch.zeros(len(stage.term_names), requires_grad=True),
            torch.zeros((B, S), dtype=torch.int64))


def _step(stage: StageModule, inputs: tuple, precision: Precision):
    """One microbatch's forward through the stage (the training loop's autocast)."""
    with precision.autocast("cpu"):
        return stage(*inputs)


def _total(snapshot: dict) -> int:
    return sum(_by_part(snapshot).values())


def measure_stage(cfg: TrainConfig, blocks: list[int], first: bool, last: bool,
                  device_type: str = "cuda") -> StageMemory:
    """One stage's memory on rank 0 of its mesh (`cfg` is `stage_config`'s)."""
    p = cfg.parallel
    world = p.dp_replicate * p.dp_shard * p.ep * p.tp
    precision = Precision.resolve(cfg.trainer.precision, device_type, check_support=False)
    B, S = cfg.data.batch_size, cfg.data.seq_len
    x_dtype = torch.bfloat16 if cfg.trainer.precision == "bf16" else torch.float32
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")  # tp's plan names the final norm a middle stage lacks
        if world > 1:
            stack.enter_context(fake_world(world))
        mesh = build_mesh(p, "cpu", cfg.expert)
        stage = _stage_module(cfg, blocks, first, last)
        # as the Trainer builds it: split-backward (zero-bubble) stages keep blocks gathered
        parallelize(stage, mesh, cfg, precision,
                    reshard_after_forward=p.pp_schedule not in SPLIT_BACKWARD)
        use_balanced_routing(stage)
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stage.to_empty(device="cpu")
        stage.train()
        optimizer = build_optimizer(stage, cfg.optim)
        with torch.no_grad():  # lazy init and sharding caches, untracked (see memory.py)
            _step(stage, _inputs(stage, 1, 2 * p.tp, x_dtype), precision)
        if hasattr(stage, "reshard"):
            stage.reshard()
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        optimizer.step()
        inputs = _inputs(stage, B, S, x_dtype)
        tracker = FSDPMemTracker(stage, optimizer) if mesh is not None else MemTracker()
        if mesh is None:
            tracker.track_external(stage, optimizer, *inputs)
        else:
            tracker.track_inputs(inputs)
        a2a = _AllToAllBytes()
        with tracker, a2a:
            before = tracker.get_tracker_snapshot("current")
            out = _step(stage, inputs, precision)
            after_forward = _total(tracker.get_tracker_snapshot("current"))
            _step_backward(stage, out)
            del out
            after_backward = _total(tracker.get_tracker_snapshot("current"))
        peak = max(_total(tracker.get_tracker_snapshot("peak")), after_backward)
    base_parts = _by_part(before)
    base = sum(base_parts.values())
    parts = {k: base_parts[k] for k in ("parameters", "gradients", "optimizer_states")}
    parts["fsdp_unsharded"] = _by_part(tracker.get_tracker_snapshot("peak"))["fsdp_unsharded"]
    return StageMemory(base=base, saved=max(after_forward - base, 0),
                       extra=max(peak - after_forward, 0), parts=parts, all_to_all=a2a.peak)


def _step_backward(stage: StageModule, out) -> None:
    """The backward of one microbatch: of the loss on the last stage, else of the outputs
    (the gradient the next stage would send back)."""
    if stage.last:
        out[0].backward()
    else:  # the terms have no graph on a stage without MoE layers
        sent = [t for t in out[:2] if t.requires_grad]
        torch.autograd.backward(sent, [torch.ones_like(t) for t in sent])


def stage_memory(cfg: TrainConfig, blocks: list[int], first: bool, last: bool,
                 device_type: str = "cuda") -> StageMemory:
    """`measure_stage`, measured directly for up to 3 repeats of the layer pattern; longer
    stages at 1 and 2 repeats, extended linearly (as `memory.rank_memory` does)."""
    m = cfg.model
    prefix = sum(1 for i in blocks if i < min(m.n_dense_layers, m.n_layers))
    period = m.moe_every
    count, tail = divmod(len(blocks) - prefix, period)
    if count <= 3:
        return measure_stage(cfg, blocks, first, last, device_type)
    one = measure_stage(cfg, blocks[:prefix + period + tail], first, last, device_type)
    two = measure_stage(cfg, blocks[:prefix + 2 * period + tail], first, last, device_type)

    def ext(a: int, b: int) -> int:
        return a + (count - 1) * (b - a)

    return StageMemory(base=ext(one.base, two.base), saved=ext(one.saved, two.saved),
                       extra=ext(one.extra, two.extra),
                       parts={k: ext(one.parts[k], two.parts[k]) for k in one.parts},
                       all_to_all=ext(one.all_to_all, two.all_to_all))


def _signature(cfg: TrainConfig, blocks: range, first: bool, last: bool) -> tuple:
    n_moe = sum(is_moe_layer(i, cfg.model) for i in blocks)
    return first, last, len(blocks) - n_moe, n_moe


def pipeline_rank_memory(cfg: TrainConfig, device_type: str = "cuda") -> RankMemory:
    """The peak memory over the pipeline ranks of `cfg` (pp > 1), by part; `per_pp_rank` lists
    every pipeline rank's peak."""
    p = cfg.parallel
    m = step_microbatches(cfg)
    check_pipeline(cfg.model, p.pp, p.pp_schedule, m, p.pp_layers)
    n_stages = p.pp * stages_per_rank(p.pp_schedule)
    ranges = split_layers(cfg.model.n_layers, n_stages, p.pp_layers)
    scfg = stage_config(cfg)
    measured: dict[tuple, StageMemory] = {}
    mems = {}
    for i, blocks in enumerate(ranges):
        first, last = i == 0, i == n_stages - 1
        key = _signature(cfg, blocks, first, last)
        if key not in measured:
            measured[key] = stage_memory(scfg, list(blocks), first, last, device_type)
        mems[i] = measured[key]
    held = held_microbatches(p.pp_schedule, p.pp, m)
    per_rank, best = [], None
    for rank in range(p.pp):
        ids = stage_indices(rank, p.pp, p.pp_schedule)
        base = sum(mems[s].base for s in ids)
        live = max(sum(n * mems[s].saved for s, n in counts.items()) + mems[stage].extra
                   for stage, counts in held[rank])
        per_rank.append(base + live)
        if best is None or base + live > per_rank[best]:
            best = rank
    ids = stage_indices(best, p.pp, p.pp_schedule)
    parts = dict.fromkeys(PARTS, 0)
    for s in ids:
        for k in ("parameters", "gradients", "optimizer_states"):
            parts[k] += mems[s].parts[k]
    parts["fsdp_unsharded"] = max(mems[s].parts["fsdp_unsharded"] for s in ids)
    parts["activations"] = per_rank[best] - sum(parts.values())
    return RankMemory(parts=parts, peak=per_rank[best],
                      all_to_all=max(mems[s].all_to_all for s in ids),
                      world_size=world_size_of(cfg),
                      per_pp_rank=per_rank, peak_pp_rank=best, peak_stages=ids)


def layout_memory(cfg: TrainConfig, device_type: str = "cuda") -> RankMemory:
    """Rank memory of any layout: per pipeline stage under pp > 1, else `rank_memory`."""
    if cfg.parallel.pp > 1:
        return pipeline_rank_memory(cfg, device_type)
    return rank_memory(cfg, device_type)
