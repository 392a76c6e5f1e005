"""Per-rank memory, measured by running the real parallelisation code at the target world size.

One process pretends to be rank 0 of the whole cluster: torch's fake process group (collectives
complete at once, moving nothing) stands in for NCCL, and fake tensors (shapes, dtypes and devices,
no storage) stand in for data. Inside that world the planner does what a training rank does:

    build_mesh(parallel) -> Transformer on meta -> parallelize (AC, EP split, FSDP2) ->
    allocate (fake) -> AdamW -> a full step to create the optimizer states ->
    a tracked forward + backward (torch.distributed._tools memory trackers)

so parameters, gradients and optimizer states are the real shards FSDP2 and expert parallelism
make, and activations are those the real layers save under the configured activation
checkpointing. Routing is assumed balanced (see `balanced.py`).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, replace
from typing import Iterator

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode

from moe_lm.config import TrainConfig
from moe_lm.errors import MoeLMError
from moe_lm.parallel import build_mesh, parallelize
from moe_lm.parallel.precision import Precision
from moe_lm.planning.balanced import use_balanced_routing
from moe_lm.planning.counting import build_meta_model
from moe_lm.training.optim import build_optimizer
from moe_lm.training.step import forward_backward

# tracker categories (torch.distributed._tools) -> the parts the plan reports
_PARTS = {
    "Sharded Param": "parameters", "Parameter": "parameters",
    "Sharded Grad": "gradients", "Gradient": "gradients",
    "OptState": "optimizer_states", "Optstate": "optimizer_states",
    "Unsharded Param": "fsdp_unsharded", "Unsharded Grad": "fsdp_unsharded",
    "All Gather": "fsdp_unsharded", "Reduce Scatter": "fsdp_unsharded",
    "Activation": "activations", "Temp": "activations", "Inputs": "activations",
    "Buffer": "activations", "Other": "activations",
}
PARTS = ("parameters", "gradients", "optimizer_states", "fsdp_unsharded", "activations")


@dataclass
class RankMemory:
    """Rank 0's memory at its peak, by part (bytes); `all_to_all` (the peak of live all-to-all
    buffers) is counted inside `activations`, which also holds temporaries and inputs."""

    parts: dict[str, int]
    peak: int
    all_to_all: int
    world_size: int
    per_pp_rank: list[int] | None = None  # pp > 1: every pipeline rank's peak
    peak_pp_rank: int = 0  # the pipeline rank whose peak this is
    peak_stages: list[int] | None = None  # the stages it holds


def world_size_of(cfg: TrainConfig) -> int:
    p = cfg.parallel
    return p.dp_replicate * p.dp_shard * p.ep * p.tp * p.pp


@contextlib.contextmanager
def fake_world(world_size: int) -> Iterator[None]:
    """A fake default process group of `world_size` ranks (this process is rank 0)."""
    if dist.is_initialized():
        raise MoeLMError("The planner needs its own (fake) process group; run it outside torchrun.")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _AllToAllBytes(TorchDispatchMode):
    """Tracks the live bytes of all-to-all output buffers and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is _ALLTOALL and isinstance(args[0], torch.Tensor):
            nbytes = args[0].untyped_storage().nbytes()
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(args[0].untyped_storage(), self._free, nbytes)
        return out

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


_ALLTOALL = torch.ops.c10d.alltoall_base_.default


def planning_config(cfg: TrainConfig) -> TrainConfig:
    """The config the shape-only pass runs: capacity dropping off (balanced routing drops nothing
    at capacity_factor >= 1; below that the plan overestimates the expert activations)."""
    if cfg.expert.capacity_factor > 0 and cfg.expert.router != "expert_choice":
        return replace(cfg, expert=replace(cfg.expert, capacity_factor=0.0))
    return cfg


def measure_rank_memory(cfg: TrainConfig, device_type: str = "cuda") -> RankMemory:
    """Rank 0's peak memory for one training step of `cfg` (vocab_size resolved) on a world of
    dp_replicate x dp_shard x ep ranks of `device_type`, measured on fake tensors."""
    cfg = planning_config(cfg)
    world = world_size_of(cfg)
    # the target device's FSDP policy (e.g. bf16 all-gathers on CUDA), its forward's autocast
    # run on the CPU where the fake tensors live
    precision = Precision.resolve(cfg.trainer.precision, device_type, check_support=False)
    with contextlib.ExitStack() as stack:
        if world > 1:
            stack.enter_context(fake_world(world))
        mesh = build_mesh(cfg.parallel, "cpu", cfg.expert)
        model = build_meta_model(cfg)
        parallelize(model, mesh, cfg, precision)
        use_balanced_routing(model)
        fake_mode = stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        model.to_empty(device="cpu")
        model.train()
        optimizer = build_optimizer(model, cfg.optim)
        tokens = torch.zeros((cfg.data.batch_size, cfg.data.seq_len + 1), dtype=torch.int64)
        # an untracked forward first: FSDP's lazy init and DTensor's sharding-propagation caches
        # (whose global-shape fake tensors are no memory of a real rank); then the optimizer
        # states, from one step on zero gradients
        n = 2 * cfg.parallel.tp  # a sequence the tp ranks split evenly
        with torch.no_grad(), precision.autocast("cpu"):
            model(tokens[:1, :n], tokens[:1, 1:n + 1], return_logits=False)
        if hasattr(model, "reshard"):  # FSDP: back to the sharded parameters
            model.reshard()
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        optimizer.step()
        if cfg.trainer.grad_accum == 1:  # else later micro-steps add to existing gradients
            optimizer.zero_grad(set_to_none=True)
        tracker = FSDPMemTracker(model, optimizer) if mesh is not None else MemTracker()
        if mesh is None:
            tracker.track_external(model, optimizer, tokens)
        else:
            tracker.track_inputs((tokens,))
        a2a = _AllToAllBytes()
        with tracker, a2a:
            forward_backward(model, tokens, precision, "cpu")
            after_backward = tracker.get_tracker_snapshot("current")
        peak_snap = tracker.get_tracker_snapshot("peak")
        del fake_mode
    snap = _by_part(peak_snap)
    done = _by_part(after_backward)
    peak = max(sum(snap.values()), sum(done.values()))  # the optimizer step adds no tensors
    return RankMemory(parts=snap if sum(snap.values()) >= sum(done.values()) else done,
                      peak=peak, all_to_all=a2a.peak, world_size=world)


def _by_part(snapshot: dict) -> dict[str, int]:
    parts = dict.fromkeys(PARTS, 0)
    for dev_snap in snapshot.values():
        for key, nbytes in dev_snap.items():
            name = getattr(key, "value", key)
            if name != "Total":
                parts[_PARTS[name]] += nbytes
    return parts


def depth_periods(cfg: TrainConfig) -> tuple[int, int, int]:
    """(prefix, period, count): the layers are `prefix` dense ones, then `count` repeats of a
    `period`-layer pattern (one MoE layer, moe_every - 1 dense), then a partial repeat. Under
    `model.share_layers=N` the pattern is one shared block applied N times (moe_every is then 1)."""
    m = cfg.model
    prefix = min(m.n_dense_layers, m.n_layers)
    period = m.moe_every * m.share_layers
    return prefix, period, (m.n_layers - prefix) // period


def with_depth(cfg: TrainConfig, n_layers: int) -> TrainConfig:
    return replace(cfg, model=replace(cfg.model, n_layers=n_layers))


def rank_memory(cfg: TrainConfig, device_type: str = "cuda") -> RankMemory:
    """`measure_rank_memory` of the full model, measured directly for up to 3 repeats of the
    layer pattern; deeper models are measured at 1 and 2 repeats and extended linearly (every
    repeat adds the same shards, saved activations and buffers; the tests check that the
    extension equals a direct measurement to the byte)."""
    prefix, period, count = depth_periods(cfg)
    if count <= 3:
        return measure_rank_memory(cfg, device_type)
    tail = cfg.model.n_layers - prefix - count * period
    one = measure_rank_memory(with_depth(cfg, prefix + period + tail), device_type)
    two = measure_rank_memory(with_depth(cfg, prefix + 2 * period + tail), device_type)

    def extend(a: int, b: int) -> int:
        return a + (count - 1) * (b - a)

    parts = {k: extend(one.parts[k], two.parts[k]) for k in PARTS}
    return RankMemory(parts=parts, peak=extend(one.peak, two.peak),
                      all_to_all=extend(one.all_to_all, two.all_to_all), world_size=one.world_size)
