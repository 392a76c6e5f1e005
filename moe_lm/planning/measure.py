"""Measuring what the planner predicts: the peak tensor memory of real training steps on the CPU.

`measure_training_peak` runs the same steps a training rank runs (meta model -> mesh ->
parallelize -> allocate and init -> AdamW; forward with the loop's autocast, backward, clip, step)
on real tensors, under the torch profiler's memory tracking: every CPU allocation and free is an
event carrying the allocator's running total, whose peak is the measured peak. It starts before the model is
allocated, so the peak covers parameters, gradients, optimizer states and activations. Run it in
each process of a `torchrun`/gloo group to measure a sharded rank.
"""

from __future__ import annotations

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from moe_lm.config import TrainConfig
from moe_lm.errors import ConfigError
from moe_lm.parallel import build_mesh, clip_grad_norm_, init_on_device, parallelize
from moe_lm.parallel.pipeline import (build_schedule, build_stage_modules, pipeline_step,
                                      step_microbatches)
from moe_lm.parallel.precision import Precision
from moe_lm.planning.counting import build_meta_model
from moe_lm.training.optim import build_optimizer
from moe_lm.training.step import forward_backward


def _train_steps(cfg: TrainConfig, steps: int) -> None:
    device = torch.device("cpu")
    precision = Precision.resolve(cfg.trainer.precision, "cpu")
    mesh = build_mesh(cfg.parallel, "cpu", cfg.expert)
    model = build_meta_model(cfg)
    parallelize(model, mesh, cfg, precision)
    init_on_device(model, device, cfg.trainer.seed)
    model.train()
    optimizer = build_optimizer(model, cfg.optim)
    gen = torch.Generator().manual_seed(cfg.trainer.seed)
    B, S = cfg.data.batch_size, cfg.data.seq_len
    for _ in range(steps):
        for _ in range(cfg.trainer.grad_accum):
            batch = torch.randint(0, cfg.model.vocab_size, (B, S + 1), generator=gen)
            forward_backward(model, batch, precision, "cpu", grad_divisor=cfg.trainer.grad_accum)
        clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _pipeline_steps(cfg: TrainConfig, steps: int) -> None:
    """This rank's stages of a `parallel.pp`-rank pipeline (no other mesh dim: one process per
    stage rank), torch's schedule over the Trainer's microbatches (`step_microbatches`: the
    step's grad_accum x data.batch_size sequences), clip over the stages, AdamW."""
    import torch.distributed as dist

    p = cfg.parallel
    microbatches = step_microbatches(cfg)
    ids, modules = build_stage_modules(build_meta_model(cfg), dist.get_rank(), p.pp,
                                       p.pp_schedule, p.pp_layers)
    for m in modules:
        init_on_device(m, "cpu", cfg.trainer.seed)
        m.train()
    optimizer = build_optimizer(torch.nn.ModuleList(modules), cfg.optim)
    B, S = cfg.trainer.grad_accum * cfg.data.batch_size, cfg.data.seq_len
    schedule = build_schedule(modules, ids, p.pp, p.pp_schedule, microbatches,
                              (B // microbatches, S + 1), torch.device("cpu"), None)
    gen = torch.Generator().manual_seed(cfg.trainer.seed)
    for _ in range(steps):
        batch = torch.randint(0, cfg.model.vocab_size, (B, S + 1), generator=gen)
        pipeline_step(schedule, modules, batch)
        clip_grad_norm_([q for m in modules for q in m.parameters()], cfg.optim.grad_clip,
                        pp_group=dist.group.WORLD)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def measure_training_peak(cfg: TrainConfig, steps: int = 2) -> int:
    """Peak bytes of live CPU tensors over `steps` real optimizer steps of `cfg` in this process
    (vocab_size resolved; a process group initialised when the mesh has more than one rank;
    with `parallel.pp > 1` the world is the pipeline and this process runs its stages)."""
    run = _pipeline_steps if cfg.parallel.pp > 1 else _train_steps
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run(cfg, steps)
    events = []  # (time, bytes allocated (+) or freed (-), allocator total after it)

    def walk(node) -> None:
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            f = node.extra_fields
            events.append((node.start_time_ns, f.alloc_size, f.total_allocated))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    if not events:
        raise RuntimeError("the profiler recorded no CPU allocations")
    events.sort()
    before = events[0][2] - events[0][1]  # what was allocated when profiling began
    return max(total for _, _, total in events) - before


def _rank_main(rank: int, cfg: TrainConfig, nprocs: int, init_file: str, out_dir: str,
               steps: int) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=nprocs)
    try:
        peak = measure_training_peak(cfg, steps)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"peak_{rank}"), "w") as f:
        f.write(str(peak))


def measure_training_peak_distributed(cfg: TrainConfig, steps: int = 2) -> list[int]:
    """`measure_training_peak` in each of dp_replicate x dp_shard x ep x tp (or, for a
    pipeline, pp) CPU processes joined by gloo; returns every rank's peak bytes."""
    import os
    import tempfile

    import torch.multiprocessing as mp

    p = cfg.parallel
    nprocs = p.dp_replicate * p.dp_shard * p.ep * p.tp * p.pp
    if p.pp > 1 and nprocs != p.pp:
        raise ConfigError(f"measure_training_peak_distributed runs a pipeline (parallel.pp={p.pp}) "
                          "as one process per stage rank: set parallel.dp_replicate, dp_shard, "
                          "ep and tp to 1, or measure with parallel.pp=1.")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_rank_main, args=(cfg, nprocs, init_file, tmp, steps), nprocs=nprocs)
        return [int(open(os.path.join(tmp, f"peak_{r}")).read()) for r in range(nprocs)]
