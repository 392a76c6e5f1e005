"""Scale-out: the device mesh, FSDP2 + expert parallelism, layout-independent init, AC, clipping.

    mesh = build_mesh(cfg.parallel, device_type, cfg.expert)   # None for one process
    model = parallelize(meta_model, mesh, cfg)
    init_on_device(model, device, seed)
"""

from moe_lm.parallel.checkpointing import apply_activation_checkpointing
from moe_lm.parallel.expert_parallel import (ExpertParallelDispatcher, all_to_all_rows,
                                             distribute_experts)
from moe_lm.parallel.fsdp import clip_grad_norm_, parallelize
from moe_lm.parallel.mesh import (
    MESH_DIMS,
    build_mesh,
    data_parallel_size,
    dense_mesh,
    expert_fsdp_mesh,
    validate_layout,
)
from moe_lm.parallel.seeded_init import init_on_device, seeded_init

__all__ = [
    "ExpertParallelDispatcher", "MESH_DIMS", "all_to_all_rows", "apply_activation_checkpointing",
    "build_mesh", "clip_grad_norm_", "data_parallel_size", "dense_mesh", "distribute_experts",
    "expert_fsdp_mesh", "init_on_device", "parallelize", "seeded_init", "validate_layout",
]
