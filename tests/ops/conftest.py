"""Runs the Triton kernels under the CPU interpreter when no GPU is present.

`triton.jit` picks interpreter-or-GPU when a kernel is defined, so the variable is set here,
before any test module imports moe_lm.kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
