"""Parallelising a (meta-built) Transformer over the mesh: AC, expert parallel, FSDP2, clipping.

    model = Transformer(...) on the meta device      # shapes only, nothing allocated
    mesh = build_mesh(cfg.parallel, "cpu", cfg.expert)
    parallelize(model, mesh, cfg)                    # AC hooks, EP split, fully_shard
    init_on_device(model, device, seed)              # each rank allocates + fills its shards

Order inside `parallelize`: activation checkpointing hooks first (they then wrap FSDP's
all-gathers), then per MoE layer the EP split of the experts and their own FSDP group, then each
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
from moe_lm.parallel.mesh import dense_mesh, expert_fsdp_mesh
from moe_lm.parallel.precision import Precision


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
                precision: Precision | None = None) -> nn.Module:
    """Applies activation checkpointing, expert parallelism and FSDP2 to `model` in place.

    Works on a meta-device model and with any process-group backend (gloo, nccl, or torch's fake
    backend for planning). With `mesh=None` (one process) only activation checkpointing applies.
    `precision` (default: `trainer.precision` on the mesh's device) sets FSDP2's mixed precision;
    the planner passes the target device's, its own mesh being on the CPU.
    """
    apply_activation_checkpointing(model, cfg.trainer.activation_checkpointing)
    if mesh is None:
        return model
    if precision is None:
        precision = Precision.resolve(cfg.trainer.precision, mesh.device_type)
    mp = precision.fsdp_policy()
    world = mesh.size()
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
                            shard_placement_fn=lambda p: Shard(expert_shard_dim(p.shape, dp_shard)))
                # each rank's expert gradient already sums the tokens of its EP group: divide
                # the FSDP sum over the remaining ranks by the whole data-parallel world
                moe.experts.set_gradient_divide_factor(float(world))
                if sum_only and dp_shard > 1:  # (with one shard torch already divides once)
                    moe.experts.set_force_sum_reduction_for_comms(True)
            moe.set_dispatcher(ExpertParallelDispatcher(moe.cfg.num_experts, dist.group.WORLD,
                                                        ep_group))
        fully_shard(block, mesh=dense_mesh(mesh), mp_policy=mp)
    fully_shard(model, mesh=dense_mesh(mesh), mp_policy=mp)
    return model


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Clips gradients to a total 2-norm of `max_norm`; returns the norm before clipping.

    `max_norm=None` (`optim.grad_clip=null`) only measures the norm.

    The norm is that of the whole unsharded model: sharded (DTensor) gradients are reduced over
    their mesh, and parameters living on different meshes (dense vs expert weights) are combined
    here, which torch's clip_grad_norm_ cannot do in one call.
    """
    groups: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p.grad)
    if not groups:
        return torch.zeros(())
    norms = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    device = norms[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
    if max_norm is None:
        return total
    coef = max_norm / (float(total) + 1e-6)
    if coef < 1.0 and math.isfinite(coef):
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
    return total
