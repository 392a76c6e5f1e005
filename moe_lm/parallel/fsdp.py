"""Parallelising a (meta-built) Transformer over the mesh: AC, expert parallel, FSDP2, clipping.

    model = Transformer(...) on the meta device      # shapes only, nothing allocated
    mesh = build_mesh(cfg.parallel, "cpu", cfg.expert)
    parallelize(model, mesh, cfg)                    # AC hooks, EP split, fully_shard
    init_on_device(model, device, seed)              # each rank allocates + fills its shards

Order inside `parallelize`: activation checkpointing hooks first (they then wrap FSDP's
all-gathers), tensor parallelism (`parallel.tp`, DTensor styles), then per MoE layer the EP split of the experts and their own FSDP group, then each
block, then the root (embeddings, final norm, LM head).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from moe_lm.config import TrainConfig
from moe_lm.errors import ConfigError
from moe_lm.parallel.checkpointing import apply_activation_checkpointing
from moe_lm.parallel.expert_parallel import ExpertParallelDispatcher, distribute_experts
from moe_lm.parallel.mesh import data_parallel_size, dense_mesh, expert_fsdp_mesh, stage_group
from moe_lm.parallel.precision import Precision
from moe_lm.parallel.tensor_parallel import (apply_tensor_parallel, check_tensor_parallel,
                                             fsdp_shard_dim)


def expert_shard_dim(shape: torch.Size, dp_shard: int) -> int:
    """The dim the FSDP shards of an expert weight (E, a, b) split: not the EP dim 0, so that
    each rank's shard stays one box of the full tensor; the first of a, b that divides evenly."""
    for dim in (1, 2):
        if shape[dim] % dp_shard == 0:
            return dim
    raise ConfigError(
        f"parallel.dp_shard={dp_shard} divides neither inner dim of the expert weights {tuple(shape)}"
        " (model.d_model, expert.hidden_size): choose a dp_shard that divides one of them.")


def parallelize(model: nn.Module, mesh: DeviceMesh | None, cfg: TrainConfig,
                precision: Precision | None = None, reshard_after_forward: bool = True
                ) -> nn.Module:
    """Applies activation checkpointing, expert parallelism and FSDP2 to `model` in place.

    Works on a meta-device model and with any process-group backend (gloo, nccl, or torch's fake
    backend for planning). With `mesh=None` (one process) only activation checkpointing applies.
    `precision` (default: `trainer.precision` on the mesh's device) sets FSDP2's mixed precision;
    the planner passes the target device's, its own mesh being on the CPU.
    `reshard_after_forward=False` keeps the blocks' weights gathered from forward to backward:
    the pipeline's split backward (zero-bubble schedules) needs it (see `pipeline_step`).
    """
    check_tensor_parallel(cfg)
    apply_activation_checkpointing(model, cfg.trainer.activation_checkpointing)
    if mesh is None:
        return model
    if precision is None:
        precision = Precision.resolve(cfg.trainer.precision, mesh.device_type)
    mp = precision.fsdp_policy()
    world = data_parallel_size(mesh)  # tp ranks hold the same tokens: not part of the average
    dense = dense_mesh(mesh)
    placement = None
    if mesh["tp"].size() > 1:
        apply_tensor_parallel(model, mesh["tp"])
        placement = lambda p: fsdp_shard_dim(p, dense.size(dense.ndim - 1))  # noqa: E731
    ep, dp_shard = mesh["ep"].size(), mesh["dp_shard"].size()
    sum_only = dist.get_backend() == "gloo"  # gloo has no PREMUL_SUM reduction
    for block in model.layers:
        if getattr(block, "is_moe", False):
            moe = block.mlp
            ep_group = None
            if ep > 1:
                distribute_experts(moe.experts, mesh["ep"])
                ep_group = mesh["ep"].get_group()
                fully_shard(moe.experts, mesh=expert_fsdp_mesh(mesh), mp_policy=mp,
                            reshard_after_forward=reshard_after_forward,
                            shard_placement_fn=lambda p: Shard(expert_shard_dim(p.shape, dp_shard)))
                # each rank's expert gradient already sums the tokens of its EP group: divide
                # the FSDP sum over the remaining ranks by the whole data-parallel world
                moe.experts.set_gradient_divide_factor(float(world))
                if sum_only and dp_shard > 1:  # (with one shard torch already divides once)
                    moe.experts.set_force_sum_reduction_for_comms(True)
            moe.set_dispatcher(ExpertParallelDispatcher(moe.cfg.num_experts, stage_group(mesh),
                                                        ep_group))
        fully_shard(block, mesh=dense, mp_policy=mp, shard_placement_fn=placement,
                    reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dense, mp_policy=mp, shard_placement_fn=placement)
    return model


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float | None,
                    pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Clips gradients to a total 2-norm of `max_norm`; returns the norm before clipping.

    `max_norm=None` (`optim.grad_clip=null`) only measures the norm.

    The norm is that of the whole unsharded model: sharded (DTensor) gradients are reduced over
    their mesh, and parameters living on different meshes (dense vs expert weights) are combined
    here, which torch's clip_grad_norm_ cannot do in one call. With `pp_group` (pipeline
    parallelism: each rank holds some stages) the stages' squared norms are summed over it.
    """
    groups: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p.grad)
    norms = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    device = norms[0].device if norms else torch.device("cpu")
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms] or
                                                 [torch.zeros((), device=device)]))
    if pp_group is not None:
        square = total.pow(2)
        dist.all_reduce(square, group=pp_group)
        total = square.sqrt()
    if max_norm is None:
        return total
    coef = max_norm / (float(total) + 1e-6)
    if coef < 1.0 and math.isfinite(coef):
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
    return total
