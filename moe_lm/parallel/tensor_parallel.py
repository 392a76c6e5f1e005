"""Tensor parallelism (`parallel.tp`) with DTensor: `parallelize_module` and its parallel styles.

Legend: B batch, S sequence, D model width, H query heads, G key/value heads, Dh head width,
r this rank's index on the tp mesh, tp its size.

Between the blocks the residual stream is sequence parallel: each tp rank holds (B, S/tp, D),
its slice of the sequence (Shard(1)), and the norms run on that slice (`SequenceParallel`, their
weights replicated). Inside a block:

    attention   input all-gathered to (B, S, D); wq colwise (H/tp local heads); wkv colwise, its
                (B, S, 2*G*Dh) output all-gathered and each rank keeps its G/tp heads of k and v;
                wo rowwise, reduce-scattered back to the sequence slice
    dense MLP   input all-gathered; w1/w3 colwise, w2 rowwise, reduce-scattered to the slice
    MoE         input all-gathered; router and routed experts replicated over tp (experts are
                split by `ep`), so every tp rank routes the same tokens; shared experts w1/w3
                colwise, w2 rowwise; the output goes back to the sequence slice

The embedding runs replicated and its output is split by sequence before the first block; the
final norm gathers the sequence so that the LM head and the loss see every token on every tp
rank. Everything outside a DTensor is therefore computed identically on all tp ranks and its
gradients need no reduction over tp; DTensor reduces the rest.

wkv holds k's rows, then v's: sharding its rows (Shard(0)) hands rank r rows of k or of v, not
the heads its queries need, hence the all-gather of its (small, GQA) output. The gradient that
flows back into that replicated output is only each rank's heads' share (`Partial`), which the
redistribution turns into a reduce-scatter.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from moe_lm.config import TrainConfig
from moe_lm.errors import ConfigError

SEQ = Shard(1)  # the sequence dim of (B, S, D)


def check_tensor_parallel(cfg: TrainConfig) -> None:
    """Raises ConfigError for a `parallel.tp` that cannot split this model (before allocation)."""
    tp, m, e = cfg.parallel.tp, cfg.model, cfg.expert
    if tp < 1:
        raise ConfigError(f"parallel.tp={tp} must be >= 1 (1 = no tensor parallelism).")
    if tp == 1:
        return
    sizes = {"model.n_heads": m.n_heads, "model.n_kv_heads": m.n_kv_heads,
             "data.seq_len (sequence parallel)": cfg.data.seq_len}
    if m.n_dense_layers > 0 or m.moe_every > 1:
        sizes["model.ffn_hidden"] = m.ffn_hidden
    if e.num_shared:
        sizes["expert.hidden_size x expert.num_shared"] = e.hidden_size * e.num_shared
    bad = [f"{k}={v}" for k, v in sizes.items() if v % tp]
    if bad:
        raise ConfigError(
            f"parallel.tp={tp} must divide {', '.join(bad)}: each tensor-parallel rank holds an "
            "equal share of the heads, hidden units and sequence. Choose a tp that divides them "
            "(tp=1 turns tensor parallelism off).")
    if m.qk_norm != "none":  # its weights would see only this rank's heads
        raise ConfigError(f"model.qk_norm={m.qk_norm} with parallel.tp > 1 is not supported yet: "
                          "set parallel.tp=1 for this architecture.")
    if cfg.trainer.compile:
        raise ConfigError("trainer.compile=true with parallel.tp > 1 is not supported yet: set "
                          "trainer.compile=false, or parallel.tp=1.")


def _local_kv_heads(tp_mesh: DeviceMesh, n_kv_heads: int):
    """Forward hook of wkv: its replicated DTensor output (B, S, 2*G*Dh) -> this rank's G/tp
    heads of k, then of v, as a local tensor whose gradient is a partial sum over tp."""
    tp, r = tp_mesh.size(), tp_mesh.get_local_rank()
    g = n_kv_heads // tp

    def hook(module, inputs, kv: DTensor):
        kv_BSY = kv.to_local(grad_placements=[Partial()])
        B, S, _ = kv_BSY.shape
        kv_BS2GD = kv_BSY.view(B, S, 2, n_kv_heads, -1)[:, :, :, r * g:(r + 1) * g]
        return kv_BS2GD.reshape(B, S, -1)

    return hook


def _sequence_slice(tp_mesh: DeviceMesh):
    """Forward hook of a MoE layer: its (replicated) output back to this rank's sequence slice;
    in the backward the slices' gradients are all-gathered again."""

    def hook(module, inputs, output):
        out_BSD, stats = output
        dt = DTensor.from_local(out_BSD, tp_mesh, [Replicate()], run_check=False)
        return dt.redistribute(placements=[SEQ]).to_local(), stats

    return hook


def _gather_one() -> PrepareModuleInput:
    """A module's one input: this rank's sequence slice -> the whole sequence (local tensors)."""
    return PrepareModuleInput(input_layouts=(SEQ,), desired_input_layouts=(Replicate(),),
                              use_local_output=True)


def _mlp_plan(out_layout) -> dict:
    return {"w1": ColwiseParallel(), "w3": ColwiseParallel(),
            "w2": RowwiseParallel(output_layouts=out_layout)}


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Applies the plan of the module docstring to a (meta-built) Transformer, in place."""
    tp = tp_mesh.size()
    gather = PrepareModuleInput(input_layouts=(SEQ, None, None),
                                desired_input_layouts=(Replicate(), None, None),
                                use_local_output=True)
    for block in model.layers:
        attn = block.attn
        plan = {
            "attn_norm": SequenceParallel(use_local_output=True),
            "mlp_norm": SequenceParallel(use_local_output=True),
            "attn": gather, "attn.wq": ColwiseParallel(),
            "attn.wkv": ColwiseParallel(output_layouts=Replicate(), use_local_output=False),
            "attn.wo": RowwiseParallel(output_layouts=SEQ),
            "mlp": _gather_one(),
        }
        if block.is_moe:
            if block.mlp.shared is not None:
                plan.update({f"mlp.shared.{k}": v for k, v in _mlp_plan(Replicate()).items()})
        else:
            plan.update({f"mlp.{k}": v for k, v in _mlp_plan(SEQ).items()})
        parallelize_module(block, tp_mesh, plan)
        attn.wkv.register_forward_hook(_local_kv_heads(tp_mesh, attn.n_kv_heads))
        attn.n_heads, attn.n_kv_heads = attn.n_heads // tp, attn.n_kv_heads // tp  # local heads
        if block.is_moe:
            block.mlp.register_forward_hook(_sequence_slice(tp_mesh))
    parallelize_module(model, tp_mesh, {
        "layers.0": PrepareModuleInput(input_layouts=(Replicate(), None, None),
                                       desired_input_layouts=(SEQ, None, None),
                                       use_local_output=True),
        "norm": _gather_one(),
    })


def fsdp_shard_dim(param: nn.Parameter, dp_size: int) -> Shard:
    """The dim FSDP shards a weight on: dim 0, or, for a weight split by tp on dim 0, the next
    dim that divides evenly (so that every rank's piece stays one box of the full tensor, which
    the seeded init and the checkpoints address)."""
    taken = {p.dim for p in param.placements if isinstance(p, Shard)} if isinstance(
        param, DTensor) else set()
    if 0 not in taken:
        return Shard(0)
    for dim in range(1, param.dim()):
        if dim not in taken and param.shape[dim] % dp_size == 0:
            return Shard(dim)
    raise ConfigError(
        f"A tensor-parallel weight of shape {tuple(param.shape)} cannot also be sharded "
        f"{dp_size} ways by FSDP on another dim: choose a parallel.dp_shard x parallel.ep that "
        "divides model.d_model.")
