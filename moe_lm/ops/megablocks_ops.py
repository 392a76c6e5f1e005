"""The `megablocks` backend: MegaBlocks' sort/histogram and grouped GEMM (CUDA only).

Legend: T tokens, k assignments per token, M kept assignments (<= T*k), E experts, D/K/N widths.
Same signatures and semantics as `moe_lm.ops.reference` (the kernel API of `moe_lm.ops.backend.ExpertBackend`).

What comes from MegaBlocks: `route` (its CUB radix sort, which is stable, and its histogram) and
`grouped_mm` (its CUTLASS grouped GEMM, `megablocks.grouped_gemm_util.ops.gmm`, differentiable).
What does not: `gather` and `scatter` run the Triton kernels of the `triton` backend, because
MegaBlocks' permutation kernels need every assignment kept (and its own bins), while the kernel
API lets `order` omit dropped assignments.

Where megablocks or CUDA is missing, building the backend (which `get_backend("megablocks")`
does) raises ConfigError saying how to install it or which backend to choose instead.
"""

from __future__ import annotations

import functools
import importlib

import torch

from moe_lm.errors import ConfigError
from moe_lm.ops import triton_ops
from moe_lm.ops.backend import ExpertBackend

_INSTALL_HINT = ("expert.backend=megablocks needs megablocks and a CUDA GPU: on a CUDA machine run "
                 "`pip install 'moe-lm[megablocks]'`, or choose expert.backend=torch or "
                 "expert.backend=triton.")


@functools.cache
def _megablocks():
    """Returns (megablocks.ops, grouped_gemm ops) or raises ConfigError with the install hint."""
    if not torch.cuda.is_available():
        raise ConfigError(f"CUDA is not available. {_INSTALL_HINT}")
    try:
        mb_ops = importlib.import_module("megablocks.ops")
        gg = importlib.import_module("megablocks.grouped_gemm_util")
    except ImportError as err:  # megablocks or its compiled extension is missing
        raise ConfigError(f"megablocks is not importable ({err}). {_INSTALL_HINT}") from err
    if not gg.grouped_gemm_is_available():
        raise ConfigError("megablocks is installed without its grouped_gemm dependency "
                          f"(pip install grouped_gemm). {_INSTALL_HINT}")
    return mb_ops, gg.ops


def _require_cuda(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cuda":
            raise ConfigError(f"expert.backend=megablocks got a {t.device.type} tensor; it runs on "
                              "CUDA only. Use expert.backend=torch or expert.backend=triton.")




def route(expert_idx_Tk: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of the flattened assignments by expert; returns (order (T*k,), counts (E,))."""
    _require_cuda(expert_idx_Tk)
    flat_A = expert_idx_Tk.reshape(-1).to(torch.int32)
    end_bit = max(int(num_experts - 1).bit_length(), 1)
    _, order_A = _megablocks()[0].sort(flat_A, end_bit)
    counts_E = _megablocks()[0].histogram(flat_A, num_experts)
    return order_A.long(), counts_E.long()


def gather(x_TD: torch.Tensor, order_M: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows of x in expert order, each token repeated per assignment: (M, D) = x[order // k]."""
    _require_cuda(x_TD, order_M)
    return triton_ops.gather(x_TD, order_M, top_k)


def scatter(y_MD: torch.Tensor, order_M: torch.Tensor, weights_Tk: torch.Tensor) -> torch.Tensor:
    """Back to token order with the combine: out[t] = sum_j w[t, j] * y[pos(t*k + j)]; (T, D)."""
    _require_cuda(y_MD, order_M, weights_Tk)
    return triton_ops.scatter(y_MD, order_M, weights_Tk)


def grouped_mm(x_TK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm` semantics for 2D x 3D, on MegaBlocks' grouped GEMM (bf16).

    The grouped GEMM takes group sizes on the host, so this syncs once to read `offs`.
    Rows past offs[-1] belong to no group and come back as zeros.
    """
    _require_cuda(x_TK, w_EKN, offs_E)
    ends = offs_E.long().cpu()
    sizes_E = torch.diff(ends, prepend=ends.new_zeros(1))
    used = int(ends[-1]) if ends.numel() else 0
    y_UN = _megablocks()[1].gmm(x_TK[:used].contiguous(), w_EKN.contiguous(), sizes_E, trans_b=False)
    if used == x_TK.shape[0]:
        return y_UN
    return torch.cat([y_UN, y_UN.new_zeros(x_TK.shape[0] - used, y_UN.shape[1])])


class MegaBlocksBackend(ExpertBackend):
    """`expert.backend=megablocks`: the functions above behind the backend seam."""

    name = "megablocks"

    def __init__(self):
        _megablocks()  # fail when the model is built, not at the first forward

    route = staticmethod(route)
    gather = staticmethod(gather)
    scatter = staticmethod(scatter)
    grouped_mm = staticmethod(grouped_mm)
