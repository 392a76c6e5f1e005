"""Two grouped GEMMs of one input, `(x @ w_a, x @ w_b)` per group: the SwiGLU's w1 and w3.

Legend: T rows (grouped by expert), K input width, N output width, E groups.

The backward (CPU; where `torch._grouped_mm` is a loop of per-group matmuls anyway) runs group
by group, and in each group:
- the input gradient `da @ w_a^T + db @ w_b^T`: written by one matmul, the other accumulated in
  place with `addmm` (the same speed as a plain matmul), not two products and an add;
- the weight gradients `x_e^T @ da` and `x_e^T @ db`, in bf16 from one copy of `x_e^T`: a bf16
  matmul whose left operand is a transposed view takes a slower path than a row-major one, and
  transposing the group's rows (while they sit in cache) pays for itself with the first of the
  two products (measured: experiments/results/cpu_bench_2026-11-26_session3.md).
"""

from __future__ import annotations

import torch

# dtypes whose weight gradients run faster from a transposed copy (measured per expert, two
# products from one copy against two from the view, in cpu_bench_2026-11-26_session3.md: faster
# in bf16 only; fp32 and fp16 keep the view)
COPY_TRANSPOSED_DTYPES = (torch.bfloat16,)


class GroupedMMPair(torch.autograd.Function):
    """(x @ w_a[e], x @ w_b[e]) for the rows of each group e; rows past offs[-1] give zeros."""

    @staticmethod
    def forward(ctx, x_TK: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor,
                offs_E: torch.Tensor, grouped_mm) -> tuple[torch.Tensor, torch.Tensor]:
        """`grouped_mm`: the backend's, for the forward products."""
        ctx.save_for_backward(x_TK, w_a, w_b, offs_E)
        return grouped_mm(x_TK, w_a, offs_E), grouped_mm(x_TK, w_b, offs_E)

    @staticmethod
    def backward(ctx, grad_a: torch.Tensor, grad_b: torch.Tensor):
        x_TK, w_a, w_b, offs_E = ctx.saved_tensors
        grad_a, grad_b = grad_a.contiguous(), grad_b.contiguous()
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x_TK) if need_x else None
        # contiguous whatever the weights' strides: each group's block is a matmul's `out`
        dense = torch.contiguous_format
        grad_wa = torch.empty_like(w_a, memory_format=dense) if need_a else None
        grad_wb = torch.empty_like(w_b, memory_format=dense) if need_b else None
        start = 0
        for e, end in enumerate(offs_E.tolist()):
            if end <= start:  # an empty group: no gradient rows, zero weight gradients
                for grad_w in (grad_wa, grad_wb):
                    if grad_w is not None:
                        grad_w[e].zero_()
                start = max(start, end)
                continue
            rows = slice(start, end)
            if need_x:
                torch.mm(grad_a[rows], w_a[e].t(), out=grad_x[rows])
                # addmm with out = input: in place, and visible to FLOP counters (addmm_ is not)
                torch.addmm(grad_x[rows], grad_b[rows], w_b[e].t(), out=grad_x[rows])
            if need_a or need_b:
                x_KR = x_TK[rows].t()
                if x_KR.dtype in COPY_TRANSPOSED_DTYPES:
                    x_KR = x_KR.contiguous()
                if need_a:
                    torch.mm(x_KR, grad_a[rows], out=grad_wa[e])
                if need_b:
                    torch.mm(x_KR, grad_b[rows], out=grad_wb[e])
            start = end
        if need_x:
            grad_x[start:].zero_()  # rows past the last group
        return grad_x, grad_wa, grad_wb, None, None
