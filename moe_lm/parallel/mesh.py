"""The device mesh: `parallel.pp x dp_replicate x dp_shard x ep x tp` ranks, checked first.

`pp` is the outermost dim: pipeline rank p holds ranks [p * W/pp, (p+1) * W/pp), each a complete
`dp_replicate x dp_shard x ep x tp` mesh of its stage(s) (moe_lm.parallel.pipeline); the ranks of
one stage are its data-parallel world (the balance loss, EP and FSDP never cross stages). Every rank of a tensor-parallel group (`tp`, the innermost dim: neighbouring ranks, fast links)
works on the same slice of the batch; the data-parallel degree is the world over tp.
Parameters are laid out over the mesh like this:

    dense weights (attention, norms, embeddings, router, dense MLPs)
        FSDP-sharded over dp_shard x ep (flattened), replicated over dp_replicate (HSDP)
    expert weights (E, ., .)
        split by expert over ep (rank i holds experts [i*E/ep, (i+1)*E/ep)), FSDP-sharded over
        dp_shard, replicated over dp_replicate
    with tp > 1 (moe_lm.parallel.tensor_parallel) attention, dense MLPs and shared experts are
        also split over tp; router and routed experts are replicated over tp

`validate_layout` runs before any process group or model exists, so a bad layout costs seconds,
not a model allocation. `build_mesh` needs an initialised default process group (torchrun, or a
fake one for planning) and returns None for a single process.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moe_lm.config import ExpertConfig, ParallelConfig
from moe_lm.errors import ConfigError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "ep", "tp")
DENSE_SHARD_DIM = "dp_shard_ep"  # dp_shard and ep flattened: what dense weights shard over
STAGE_DIM = "stage"  # all dims but pp flattened: the ranks of one pipeline stage (pp > 1 only)


def mesh_shape(parallel: ParallelConfig) -> tuple[int, int, int, int, int]:
    """(pp, dp_replicate, dp_shard, ep, tp), the mesh shape in MESH_DIMS order."""
    return (parallel.pp, parallel.dp_replicate, parallel.dp_shard, parallel.ep, parallel.tp)


def validate_layout(parallel: ParallelConfig, expert: ExpertConfig, world_size: int,
                    device_type: str) -> None:
    """Raises ConfigError (saying what to change) for a layout that cannot run on this world.

    Checks: the mesh product equals the world size, the experts split evenly over `ep`, and no
    CUDA-only setting is asked of a CPU run. Call it before allocating anything.
    """
    p, r, s, e, t = mesh_shape(parallel)
    if min(p, r, s, e, t) < 1:
        raise ConfigError(f"parallel.pp={p}, parallel.dp_replicate={r}, parallel.dp_shard={s}, "
                          f"parallel.ep={e} and parallel.tp={t} must all be >= 1.")
    if p > 1 and t > 1:  # sequence-parallel activations would cross the stage boundaries
        raise ConfigError(f"parallel.pp={p} with parallel.tp={t} is not supported yet: choose "
                          "one of them (pp composes with dp_replicate, dp_shard and ep; a "
                          "checkpoint saved under pp resumes under tp and back).")
    if p * r * s * e * t != world_size:
        hint = (f" (e.g. parallel.dp_shard={world_size // (p * r * e * t)})"
                if world_size % (p * r * e * t) == 0 else "")
        pp_text = f"parallel.pp={p} x " if p > 1 else ""
        tp_text = f" x parallel.tp={t}" if t > 1 else ""
        n = p * r * s * e * t
        raise ConfigError(
            f"The mesh {pp_text}parallel.dp_replicate={r} x parallel.dp_shard={s} x parallel.ep="
            f"{e}{tp_text} = {n} ranks, but this run has {world_size} process(es). Make the "
            f"product equal the world size{hint}, or launch {n} processes "
            "(torchrun --nproc_per_node=N, x nodes).")
    if expert.num_experts % e != 0:
        raise ConfigError(
            f"expert.num_experts={expert.num_experts} is not divisible by parallel.ep={e}: each EP "
            "rank must hold the same number of experts. Choose an EP degree that divides the "
            "number of experts.")
    if device_type != "cuda" and expert.backend == "megablocks":
        raise ConfigError("expert.backend=megablocks needs CUDA, but this run is on "
                          f"{device_type}: use expert.backend=torch (or triton) on CPU.")
    if device_type == "cpu" and world_size > 1 and not dist.is_gloo_available():
        raise ConfigError("Multi-process CPU training needs the gloo backend, which this torch "
                          "build lacks: install a torch build with gloo, or run on GPUs (nccl).")


def build_mesh(parallel: ParallelConfig, device_type: str,
               expert: ExpertConfig | None = None) -> DeviceMesh | None:
    """The 5-D DeviceMesh (MESH_DIMS) over the default process group.

    Returns None for a single process (nothing to shard). Works with any backend, including
    torch's fake process group (planning a large world inside one process). With `expert`, the
    layout is validated first (see `validate_layout`).
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if expert is not None:
        validate_layout(parallel, expert, world, device_type)
    elif world != math.prod(mesh_shape(parallel)):
        raise ConfigError(f"The mesh {mesh_shape(parallel)} does not match the world size "
                          f"{world}; make pp x dp_replicate x dp_shard x ep x tp equal it.")
    if world == 1:
        return None
    mesh = init_device_mesh(device_type, mesh_shape(parallel), mesh_dim_names=MESH_DIMS)
    mesh["dp_shard", "ep"]._flatten(DENSE_SHARD_DIM)  # created once, on every rank, together
    if parallel.pp > 1:
        mesh["dp_replicate", "dp_shard", "ep", "tp"]._flatten(STAGE_DIM)
    return mesh


def stage_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """The ranks that hold the same pipeline stage(s) (the whole world without pp): those whose
    routing counts the balance loss sees together."""
    if mesh["pp"].size() == 1:
        return dist.group.WORLD
    return mesh[STAGE_DIM].get_group()


def dense_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The FSDP mesh of dense weights: 1-D dp_shard x ep, or 2-D (dp_replicate, ...) for HSDP."""
    with warnings.catch_warnings():  # slicing a flattened dim: still the documented way in 2.x
        warnings.simplefilter("ignore", UserWarning)
        if mesh["dp_replicate"].size() > 1:
            return mesh["dp_replicate", DENSE_SHARD_DIM]
        return mesh[DENSE_SHARD_DIM]


def expert_fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The FSDP mesh of expert weights (on top of their EP split): dp_shard, HSDP over dp_replicate."""
    if mesh["dp_replicate"].size() > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


def data_parallel_size(mesh: DeviceMesh | None) -> int:
    """How many ranks split the batch: the whole mesh over pp x tp (a tp group reads one slice,
    the stages of a pipeline pass it along)."""
    return 1 if mesh is None else mesh.size() // (mesh["tp"].size() * mesh["pp"].size())


def data_parallel_coords(parallel: ParallelConfig, rank: int, world: int) -> tuple[int, int]:
    """(which slice of the batch this rank reads, how many slices): the ranks of one tp group
    (the innermost mesh dim, consecutive ranks) read the same slice, and so do the pipeline
    ranks (the outermost dim) of one data-parallel coordinate."""
    per_stage = max(world // parallel.pp, 1)
    return (rank % per_stage) // parallel.tp, max(per_stage // parallel.tp, 1)


def device_type_for(device: torch.device | str) -> str:
    """The DeviceMesh device type of a torch device (meta plans use cpu meshes)."""
    kind = torch.device(device).type
    return "cpu" if kind == "meta" else kind
