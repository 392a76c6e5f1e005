"""Activation checkpointing of the transformer blocks: `trainer.activation_checkpointing`.

- none: keep every activation.
- full: keep only each block's input; recompute the block in the backward.
- selective: keep the outputs of the expensive ops (matmuls, attention, grouped GEMMs) and
  recompute the cheap elementwise ones (norms, rotary, SwiGLU gating, softmax, routing).

Uses the composable `torch.distributed._composable.checkpoint` (hooks, no wrapper module), so
parameter names and checkpoints are the same with and without it, and it composes with FSDP2.
Collectives inside a recomputed block (expert-parallel all-to-all) run again on every rank.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from moe_lm.errors import ConfigError

MODES = ("none", "full", "selective")


def _expensive_ops() -> set:
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "_grouped_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu"]
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


def _save_expensive(ops: set, ctx, func, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if func in ops else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    """The context pair for selective checkpointing (save matmul/attention outputs)."""
    return create_selective_checkpoint_contexts(partial(_save_expensive, _expensive_ops()))


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Checkpoints each block of `model.layers` according to `mode` (none | full | selective)."""
    if mode not in MODES:
        raise ConfigError(f"trainer.activation_checkpointing={mode!r}: none, full or selective.")
    if mode == "none":
        return model
    for block in model.layers:
        if mode == "full":
            checkpoint(block)
        else:
            checkpoint(block, context_fn=selective_context)
    return model
