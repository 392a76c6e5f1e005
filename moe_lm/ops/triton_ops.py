"""The `triton` backend: moe_lm.kernels wrapped as differentiable `torch.library` custom ops.

Legend: T tokens, k assignments per token, M kept assignments (<= T*k), E experts, D/K/N widths.
Same signatures and semantics as `moe_lm.ops.reference` (the kernel API of `moe_lm.ops.backend.ExpertBackend`). Every op has a fake
(meta) implementation, so models run on the meta device and trace under `torch.compile`; the
kernels themselves are opaque to the compiler. Backward passes are custom ops of their own.
"""

from __future__ import annotations

import torch

from moe_lm import kernels
from moe_lm.errors import ConfigError
from moe_lm.ops.backend import ExpertBackend

_NS = "moe_lm_triton"


def _require_runnable(*tensors: torch.Tensor) -> None:
    """ConfigError where the kernels cannot run on these tensors (CPU without the interpreter)."""
    for t in tensors:
        if t.device.type == "cpu" and not kernels.INTERPRET:
            raise ConfigError(
                "expert.backend=triton got CPU tensors, but Triton's CPU interpreter is off. "
                "Set TRITON_INTERPRET=1 in the environment before starting (it must be set before "
                "moe_lm.kernels is imported; slow, for tests), run on a CUDA GPU, or use "
                "expert.backend=torch.")


# ---------------------------------------------------------------- route (no gradient)
@torch.library.custom_op(f"{_NS}::route", mutates_args=())
def _route(expert_idx_Tk: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    _require_runnable(expert_idx_Tk)
    return kernels.route(expert_idx_Tk, num_experts)


@_route.register_fake
def _route_fake(expert_idx_Tk, num_experts):
    order = expert_idx_Tk.new_empty(expert_idx_Tk.numel(), dtype=torch.int64)
    return order, expert_idx_Tk.new_empty(num_experts, dtype=torch.int64)


def route(expert_idx_Tk: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of the flattened assignments by expert; returns (order (T*k,), counts (E,))."""
    order_A, counts_E = _route(expert_idx_Tk, num_experts)
    return order_A, counts_E


# ---------------------------------------------------------------- gather
@torch.library.custom_op(f"{_NS}::gather", mutates_args=())
def _gather(x_TD: torch.Tensor, order_M: torch.Tensor, top_k: int) -> torch.Tensor:
    _require_runnable(x_TD, order_M)
    return kernels.gather(x_TD, order_M, top_k)


@_gather.register_fake
def _gather_fake(x_TD, order_M, top_k):
    return x_TD.new_empty(order_M.shape[0], x_TD.shape[1])


@torch.library.custom_op(f"{_NS}::gather_backward", mutates_args=())
def _gather_backward(dy_MD: torch.Tensor, order_M: torch.Tensor, num_tokens: int,
                     top_k: int) -> torch.Tensor:
    _require_runnable(dy_MD, order_M)
    return kernels.gather_backward(dy_MD, order_M, num_tokens, top_k)


@_gather_backward.register_fake
def _gather_backward_fake(dy_MD, order_M, num_tokens, top_k):
    return dy_MD.new_empty(num_tokens, dy_MD.shape[1])


def _gather_setup(ctx, inputs, output):
    x_TD, order_M, top_k = inputs
    ctx.save_for_backward(order_M)
    ctx.num_tokens, ctx.top_k = x_TD.shape[0], top_k


def _gather_grad(ctx, dy_MD):
    (order_M,) = ctx.saved_tensors
    return _gather_backward(dy_MD, order_M, ctx.num_tokens, ctx.top_k), None, None


_gather.register_autograd(_gather_grad, setup_context=_gather_setup)


def gather(x_TD: torch.Tensor, order_M: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows of x in expert order, each token repeated per assignment: (M, D) = x[order // k]."""
    return _gather(x_TD, order_M, top_k)


# ---------------------------------------------------------------- scatter
@torch.library.custom_op(f"{_NS}::scatter", mutates_args=())
def _scatter(y_MD: torch.Tensor, order_M: torch.Tensor, weights_Tk: torch.Tensor) -> torch.Tensor:
    _require_runnable(y_MD, order_M, weights_Tk)
    return kernels.scatter(y_MD, order_M, weights_Tk)


@_scatter.register_fake
def _scatter_fake(y_MD, order_M, weights_Tk):
    return y_MD.new_empty(weights_Tk.shape[0], y_MD.shape[1])


@torch.library.custom_op(f"{_NS}::scatter_backward", mutates_args=())
def _scatter_backward(dout_TD: torch.Tensor, y_MD: torch.Tensor, order_M: torch.Tensor,
                      weights_Tk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _require_runnable(dout_TD, y_MD, order_M, weights_Tk)
    return kernels.scatter_backward(dout_TD, y_MD, order_M, weights_Tk)


@_scatter_backward.register_fake
def _scatter_backward_fake(dout_TD, y_MD, order_M, weights_Tk):
    return torch.empty_like(y_MD), torch.empty_like(weights_Tk)


def _scatter_setup(ctx, inputs, output):
    y_MD, order_M, weights_Tk = inputs
    ctx.save_for_backward(y_MD, order_M, weights_Tk)


def _scatter_grad(ctx, dout_TD):
    y_MD, order_M, weights_Tk = ctx.saved_tensors
    dy_MD, dw_Tk = _scatter_backward(dout_TD, y_MD, order_M, weights_Tk)
    return dy_MD, None, dw_Tk


_scatter.register_autograd(_scatter_grad, setup_context=_scatter_setup)


def scatter(y_MD: torch.Tensor, order_M: torch.Tensor, weights_Tk: torch.Tensor) -> torch.Tensor:
    """Back to token order with the combine: out[t] = sum_j w[t, j] * y[pos(t*k + j)]; (T, D)."""
    return _scatter(y_MD, order_M, weights_Tk)


# ---------------------------------------------------------------- grouped_mm
@torch.library.custom_op(f"{_NS}::grouped_mm", mutates_args=())
def _grouped_mm(x_TK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    _require_runnable(x_TK, w_EKN, offs_E)
    return kernels.grouped_mm(x_TK, w_EKN, offs_E)


@_grouped_mm.register_fake
def _grouped_mm_fake(x_TK, w_EKN, offs_E):
    return x_TK.new_empty(x_TK.shape[0], w_EKN.shape[2])


@torch.library.custom_op(f"{_NS}::grouped_mm_dx", mutates_args=())
def _grouped_mm_dx(dy_TN: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    _require_runnable(dy_TN, w_EKN, offs_E)
    return kernels.grouped_mm_dx(dy_TN, w_EKN, offs_E)


@_grouped_mm_dx.register_fake
def _grouped_mm_dx_fake(dy_TN, w_EKN, offs_E):
    return dy_TN.new_empty(dy_TN.shape[0], w_EKN.shape[1])


@torch.library.custom_op(f"{_NS}::grouped_mm_dw", mutates_args=())
def _grouped_mm_dw(x_TK: torch.Tensor, dy_TN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    _require_runnable(x_TK, dy_TN, offs_E)
    return kernels.grouped_mm_dw(x_TK, dy_TN, offs_E)


@_grouped_mm_dw.register_fake
def _grouped_mm_dw_fake(x_TK, dy_TN, offs_E):
    return x_TK.new_empty(offs_E.shape[0], x_TK.shape[1], dy_TN.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    x_TK, w_EKN, offs_E = inputs
    ctx.save_for_backward(x_TK, w_EKN, offs_E)


def _grouped_mm_grad(ctx, dy_TN):
    x_TK, w_EKN, offs_E = ctx.saved_tensors
    dy_TN = dy_TN.to(x_TK.dtype)
    dx = _grouped_mm_dx(dy_TN, w_EKN, offs_E) if ctx.needs_input_grad[0] else None
    dw = _grouped_mm_dw(x_TK, dy_TN, offs_E) if ctx.needs_input_grad[1] else None
    return dx, dw, None


_grouped_mm.register_autograd(_grouped_mm_grad, setup_context=_grouped_mm_setup)


def grouped_mm(x_TK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm` semantics for 2D x 3D: rows offs[e-1]:offs[e] of x times w[e]."""
    return _grouped_mm(x_TK, w_EKN, offs_E.to(torch.int32))


class TritonBackend(ExpertBackend):
    """`expert.backend=triton`: the custom ops above behind the backend seam."""

    name = "triton"
    route = staticmethod(route)
    gather = staticmethod(gather)
    scatter = staticmethod(scatter)
    grouped_mm = staticmethod(grouped_mm)
