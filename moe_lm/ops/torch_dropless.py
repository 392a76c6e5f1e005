"""The torch backend's dropless dispatch: every assignment is kept, so `order` is a permutation.

Legend: T tokens, k assignments per token, A = T*k assignments, P >= A rows in expert order
(A plus padding), E experts, D width.

With a full permutation each token's k rows are a fixed-size "bag": the combine is, on CPU, one
`embedding_bag` with the routing weights as per-sample weights (gather and weighted sum in one
pass, fp32 accumulation) and, on GPU (where embedding_bag is slow), a row gather and a
(1 x k) @ (k x D) batched product per token (fp32 accumulation). The gather's backward sums each
token's k rows with a row gather and plain adds, rounded to nearest-even like autograd's sum (an
unweighted bf16 `embedding_bag` is faster, but it rounds ties away from zero, and sums of two
bf16 values tie often: a systematic magnitude bias in every gradient through the layer). No
zero-filled buffers, no index_copy, no sums over the middle dim of a (T, k, D) tensor.

Row-aligned groups (`route_aligned`): `order` may also hold padding entries, values >= A, placed
after the real rows of each expert so that every expert's row count is a multiple of `align`.
Gather gives zero rows for them, scatter ignores them. On CPU the weight-gradient GEMMs reduce
over an expert's rows, and with a transposed view as left operand (w2's, from autograd) a ragged
row count makes them markedly slower (row-major ones, as GroupedMMPair's, hardly care); the
padding costs at most align - 1 rows per expert. (Measurements: experiments/results/
cpu_bench_2026-11-26_session2.md and _session3.md, moved_from_comments.md.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_ALIGN = 32  # rows; the fastest of the alignments tried (experiments/results/cpu_bench_*)


def row_alignment(rows_T: torch.Tensor, top_k: int, num_experts: int) -> int:
    """Row alignment of the expert groups for a batch of T tokens (`rows_T`: any tensor of the
    batch with T rows, e.g. x or the expert ids): 1 (none) off the CPU and under `torch.compile`
    (its row count would depend on the data), else the largest power of two up to 32 that keeps
    the expected padding (align / 2 rows per expert) within 1/32 of the rows."""
    if rows_T.device.type != "cpu" or torch.compiler.is_compiling():
        return 1
    align = MAX_ALIGN
    while align > 1 and align * num_experts * 16 > rows_T.shape[0] * top_k:
        align //= 2
    return align if align >= 16 else 1


def route_aligned(expert_idx_Tk: torch.Tensor, num_experts: int,
                  align: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like `route`, with each expert's rows padded to a multiple of `align`.

    Returns (order (P,), padded counts (E,), real counts (E,)); order lists the A assignments
    sorted by expert (stable) with each expert's padding entries (values >= A) after its rows."""
    flat = expert_idx_Tk.reshape(-1).long()
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts_E.scatter_add_(0, flat, torch.ones_like(flat))
    pad_E = (-counts_E) % align
    pad_experts = torch.repeat_interleave(torch.arange(num_experts, device=flat.device), pad_E)
    order = torch.sort(torch.cat([flat, pad_experts]), stable=True).indices
    return order, counts_E + pad_E, counts_E


def inverse_permutation(order_P: torch.Tensor) -> torch.Tensor:
    """inv with inv[order[m]] = m."""
    arange = torch.arange(order_P.numel(), device=order_P.device, dtype=order_P.dtype)
    return torch.empty_like(order_P).scatter_(0, order_P, arange)


def _source_tokens(order_P: torch.Tensor, top_k: int, num_tokens: int) -> torch.Tensor:
    """The token of each row (padding rows: any valid token, their values are overwritten)."""
    tok_P = torch.div(order_P, top_k, rounding_mode="floor")
    return tok_P.clamp_max_(num_tokens - 1) if order_P.numel() > num_tokens * top_k else tok_P


class GatherPermuted(torch.autograd.Function):
    """(P, D) rows x[order // k], zeros for padding entries."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, order_P: torch.Tensor, top_k: int) -> torch.Tensor:
        A = x_TD.shape[0] * top_k
        inv_P = inverse_permutation(order_P)  # the backward's too: computed once
        ctx.save_for_backward(inv_P)
        ctx.top_k, ctx.num_assignments = top_k, A
        x_PD = x_TD.index_select(0, _source_tokens(order_P, top_k, x_TD.shape[0]))
        if order_P.numel() > A:
            x_PD.index_fill_(0, inv_P[A:], 0)
        return x_PD

    @staticmethod
    def backward(ctx, grad_PD: torch.Tensor):
        (inv_P,) = ctx.saved_tensors
        k, A = ctx.top_k, ctx.num_assignments
        rows_A = inv_P[:A]  # padding rows get no gradient
        grad_TkD = grad_PD.index_select(0, rows_A).view(A // k, k, grad_PD.shape[1])
        if k == 1:
            return grad_TkD.view(A, -1), None, None
        grad_TD = torch.add(grad_TkD[:, 0], grad_TkD[:, 1])
        for j in range(2, k):  # rounded to nearest after each add, like autograd's sum
            grad_TD += grad_TkD[:, j]
        return grad_TD, None, None


class CombinePermuted(torch.autograd.Function):
    """out[t] = sum_j w[t, j] * y[row of assignment t*k + j]; padding rows are ignored."""

    @staticmethod
    def forward(ctx, y_PD: torch.Tensor, order_P: torch.Tensor, w_Tk: torch.Tensor,
                use_embedding_bag: bool):
        inv_P = inverse_permutation(order_P)
        bags_Tk = inv_P[:w_Tk.numel()].view(w_Tk.shape)
        ctx.save_for_backward(y_PD, order_P, w_Tk, inv_P)
        ctx.use_embedding_bag = use_embedding_bag
        if use_embedding_bag:
            return F.embedding_bag(bags_Tk, y_PD, per_sample_weights=w_Tk, mode="sum")
        y_TkD = y_PD.index_select(0, bags_Tk.reshape(-1)).view(*w_Tk.shape, y_PD.shape[1])
        with torch.autocast(y_PD.device.type, enabled=False):  # y's dtype, not autocast's
            return torch.bmm(w_Tk.unsqueeze(1), y_TkD).squeeze(1)

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):
        y_PD, order_P, w_Tk, inv_P = ctx.saved_tensors
        (T, k), P = w_Tk.shape, order_P.numel()
        A = T * k
        src_P = _source_tokens(order_P, k, T)
        # GPU: the gathered output gradient serves both gradients; CPU: embedding_bag's ops
        grad_PD = None if ctx.use_embedding_bag else grad_TD.index_select(0, src_P)
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:  # grad_y[m] = w of row m's assignment * grad_out[its token]
            w_P = w_Tk.reshape(-1)
            if P > A:  # padding rows: weight 0
                w_P = torch.cat([w_P, w_P.new_zeros(P - A)])
            w_P = w_P[order_P]
            if ctx.use_embedding_bag:  # gather and scale in one pass: bags of one row
                grad_y = F.embedding_bag(src_P.view(P, 1), grad_TD,
                                         per_sample_weights=w_P.view(P, 1), mode="sum")
            else:
                grad_y = grad_PD * w_P.unsqueeze(1)
            if P > A:  # zero, also where grad_TD is not finite
                grad_y.index_fill_(0, inv_P[A:], 0)
        if ctx.needs_input_grad[2] and ctx.use_embedding_bag:
            # embedding_bag's own weight gradient: row dots in (t, j) order, fp32 accumulation
            grad_w = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad_TD, y_PD, inv_P[:A], torch.arange(0, A, k, device=grad_TD.device),
                torch.arange(T, device=grad_TD.device).repeat_interleave(k), 0, -1)
            grad_w = grad_w.view(w_Tk.shape)
        elif ctx.needs_input_grad[2]:  # d out[t] / d w[t, j] = y of that assignment
            grad_w_P = torch.linalg.vecdot(grad_PD, y_PD)
            grad_w = w_Tk.new_empty(P).index_copy_(0, order_P, grad_w_P)[:A]
            grad_w = grad_w.view(w_Tk.shape)  # logical (t, j) order, whatever w_Tk's strides
        return grad_y, None, grad_w, None
