"""Two grouped GEMMs of one input, `(x @ w_a, x @ w_b)` per group: the SwiGLU's w1 and w3.

Legend: T rows (grouped by expert), K input width, N output width, E groups.

Autograd would compute the input's gradient as two products and then add them, one more pass over
a (T, K) tensor. On CPU, where `torch._grouped_mm` is a loop of per-group matmuls anyway, the
backward here writes `da @ w_a^T` and accumulates `db @ w_b^T` into it in place (`addmm`, the
same speed as a plain matmul), group by group.
"""

from __future__ import annotations

import torch


class GroupedMMPair(torch.autograd.Function):
    """(x @ w_a[e], x @ w_b[e]) for the rows of each group e; rows past offs[-1] give zeros."""

    @staticmethod
    def forward(ctx, x_TK: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor,
                offs_E: torch.Tensor, grouped_mm, native: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """`grouped_mm`: the backend's; `native`: whether `torch._grouped_mm` runs these."""
        ctx.save_for_backward(x_TK, w_a, w_b, offs_E)
        ctx.native = native
        return grouped_mm(x_TK, w_a, offs_E), grouped_mm(x_TK, w_b, offs_E)

    @staticmethod
    def backward(ctx, grad_a: torch.Tensor, grad_b: torch.Tensor):
        x_TK, w_a, w_b, offs_E = ctx.saved_tensors
        grad_a, grad_b = grad_a.contiguous(), grad_b.contiguous()
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x_TK) if need_x else None
        ends = offs_E.tolist()
        start = 0
        for e, end in enumerate(ends):
            if end > start and need_x:
                rows = slice(start, end)
                torch.mm(grad_a[rows], w_a[e].t(), out=grad_x[rows])
                # addmm with out = input: in place, and visible to FLOP counters (addmm_ is not)
                torch.addmm(grad_x[rows], grad_b[rows], w_b[e].t(), out=grad_x[rows])
            start = max(start, end)
        if need_x:
            grad_x[start:].zero_()  # rows past the last group
        grad_wa = _weight_grad(x_TK, grad_a, offs_E, ends, ctx.native) if need_a else None
        grad_wb = _weight_grad(x_TK, grad_b, offs_E, ends, ctx.native) if need_b else None
        return grad_x, grad_wa, grad_wb, None, None, None


def _weight_grad(x_TK: torch.Tensor, grad_TN: torch.Tensor, offs_E: torch.Tensor,
                 ends: list[int], native: bool) -> torch.Tensor:
    """(E, K, N): x_e^T @ grad_e per group, zeros for empty groups."""
    if native:  # the 2D x 2D form, groups along the reduction: one call, no Python loop
        grad_w = torch._grouped_mm(x_TK.t(), grad_TN, offs=offs_E)
        for e, (start, end) in enumerate(zip([0, *ends], ends)):
            if end <= start:  # an empty group: zeros, whatever the op leaves there
                grad_w[e].zero_()
        return grad_w
    grad_w = x_TK.new_empty(len(ends), x_TK.shape[1], grad_TN.shape[1])
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            torch.mm(x_TK[start:end].t(), grad_TN[start:end], out=grad_w[e])
        else:
            grad_w[e].zero_()
        start = max(start, end)
    return grad_w
