"""Build-time facts shared by the kernels: whether Triton runs under its CPU interpreter.

`triton.jit` decides interpreter-or-GPU when a kernel is defined, so `INTERPRET` is read once,
when this package is imported: set `TRITON_INTERPRET=1` before importing `moe_lm.kernels`.
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET: bool = bool(triton.knobs.runtime.interpret)  # as triton.jit saw it at import
# MOE_LM_KERNEL_AUTOTUNE=0: two tile configs instead of the autotuner's list (GPU tests, whose
# many shapes would otherwise each compile every config)
AUTOTUNE: bool = os.environ.get("MOE_LM_KERNEL_AUTOTUNE", "1") != "0"


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact fp32 unless torch itself allows TF32 for matmuls."""
    if INTERPRET:
        return "ieee"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def check_device(*tensors: torch.Tensor) -> None:
    """Raises RuntimeError when a CPU tensor meets kernels compiled for the GPU."""
    for t in tensors:
        if t.device.type == "cpu" and not INTERPRET:
            raise RuntimeError("moe_lm.kernels got CPU tensors but Triton was imported without "
                               "TRITON_INTERPRET=1; set it before importing moe_lm.kernels")


def interpreter_block(n: int, small: int, large: int, threshold: int = 1024) -> int:
    """Block size under the interpreter, where each program costs Python time: small blocks for
    the small test shapes (so masked edges and multi-block loops are exercised), large ones for
    real workloads (a CPU training run)."""
    return small if n < threshold else large
