"""`trainer.compile=true`: torch.compile of the transformer blocks (regional compilation).

Each block is compiled on its own, so the compiler traces one block type once per shape instead of
the whole model, which keeps compile time short; the embedding and the fused LM-head loss stay
eager (the loss is a chunked autograd Function the compiler could not improve). The MoE dispatch
and grouped GEMMs of the `triton` backend are `torch.library` custom ops with fake
implementations, so they trace into the graph as opaque calls; the `torch` backend's grouped GEMM
is `torch._grouped_mm`. Data-dependent parts (capacity dropping, the per-expert loop fallback)
break the graph and run eagerly there.

On CPU, Inductor needs a C++ compiler; where there is none, `compile_blocks` raises ConfigError
saying so. Compilation happens at the first step and costs seconds to minutes: it pays on long
runs, not on a short CPU run (see experiments/results/ for measured numbers).
"""

from __future__ import annotations

import shutil

import torch
from torch import nn

from moe_lm.errors import ConfigError


def compile_blocks(model: nn.Module, device: torch.device, backend: str = "inductor") -> nn.Module:
    """Compiles the forward of each of `model.layers` in place; returns `model`.

    `backend` is torch.compile's (tests use "aot_eager": the same tracing, no code generation)."""
    if backend == "inductor" and device.type == "cpu" and not (shutil.which("g++") or shutil.which("clang++")
                                     or shutil.which("c++")):
        raise ConfigError("trainer.compile=true on CPU needs a C++ compiler for Inductor (g++ or "
                          "clang++ on PATH): install one (e.g. apt-get install g++) or set "
                          "trainer.compile=false.")
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError("trainer.compile=true expects a model with a `layers` ModuleList of "
                          "transformer blocks.")
    for block in layers:
        block.compile(backend=backend, dynamic=False)  # in place: parameter names (checkpoints) stay the same
    return model
