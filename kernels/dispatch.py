"""Triton token dispatch: route (stable counting sort by expert), gather, scatter, and backwards.

Legend: T tokens, k assignments per token (top_k), A = T*k flattened assignments (a = t*k + j),
M kept assignments (<= A; `order` may omit dropped ones), E experts, D width, NB sort blocks.
pos_A is the inverse of order: pos[order[m]] = m, and -1 for an assignment that was dropped.
Every kernel here writes each output element exactly once (no atomics), so results are
deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import INTERPRET, check_device, interpreter_block

SORT_BLOCK = 128  # assignments per block of the counting sort


def _tuned(key: list[str]):
    """`triton.autotune` over row x column blocks of the memory-bound kernels on the GPU; under
    the interpreter the launchers pass blocks themselves (`_interpreter_blocks`)."""
    if INTERPRET:
        return lambda kernel: kernel
    shapes = [(1, 1024, 4), (2, 1024, 4), (4, 512, 4), (4, 1024, 8), (8, 512, 8), (16, 256, 8)]
    configs = [triton.Config({"BLOCK_R": r, "BLOCK_D": d}, num_warps=w) for r, d, w in shapes]
    return triton.autotune(configs=configs, key=key)


def _interpreter_blocks(rows: int, D: int) -> dict:
    if not INTERPRET:
        return {}
    return {"BLOCK_R": interpreter_block(rows, 16, 128),
            "BLOCK_D": interpreter_block(D, 64, 256, 256)}


# ---------------------------------------------------------------- route: stable counting sort
@triton.jit
def _block_histogram_kernel(idx_ptr, block_counts_ptr, A, E, NB,
                            BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """block_counts[e, b] = number of assignments of block b routed to expert e."""
    b = tl.program_id(0)
    a = b * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(idx_ptr + a, mask=a < A, other=-1).to(tl.int32)
    e = tl.arange(0, BLOCK_E)
    hist = tl.sum((ids[:, None] == e[None, :]).to(tl.int32), 0)  # (BLOCK_E,)
    tl.store(block_counts_ptr + e.to(tl.int64) * NB + b, hist, mask=e < E)


@triton.jit
def _expert_totals_kernel(block_counts_ptr, counts_ptr, NB, BLOCK_B: tl.constexpr):
    """counts[e] = sum over blocks of block_counts[e, :]; one program per expert."""
    e = tl.program_id(0)
    bs = tl.arange(0, BLOCK_B)
    total = tl.zeros((BLOCK_B,), dtype=tl.int64)
    for b0 in range(0, NB, BLOCK_B):
        total += tl.load(block_counts_ptr + e.to(tl.int64) * NB + b0 + bs, mask=b0 + bs < NB,
                         other=0)
    tl.store(counts_ptr + e, tl.sum(total, 0))


@triton.jit
def _block_bases_kernel(block_counts_ptr, counts_ptr, bases_ptr, E, NB,
                        BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr):
    """bases[e, b] = first output slot of block b's expert-e assignments (exclusive scan)."""
    e = tl.program_id(0)
    es = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + es, mask=es < e, other=0)
    run = tl.sum(counts, 0)  # start of expert e in the sorted order
    bs = tl.arange(0, BLOCK_B)
    for b0 in range(0, NB, BLOCK_B):
        row = block_counts_ptr + e.to(tl.int64) * NB + b0 + bs
        c = tl.load(row, mask=b0 + bs < NB, other=0).to(tl.int64)
        incl = tl.cumsum(c, 0)
        tl.store(bases_ptr + e.to(tl.int64) * NB + b0 + bs, run + incl - c, mask=b0 + bs < NB)
        run += tl.sum(c, 0)


@triton.jit
def _route_scatter_kernel(idx_ptr, bases_ptr, order_ptr, A, E, NB, BLOCK: tl.constexpr):
    """order[bases[e_a, b] + rank of a among earlier same-expert assignments of its block] = a."""
    b = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    a = b * BLOCK + i
    valid = a < A
    ids = tl.load(idx_ptr + a, mask=valid, other=-1).to(tl.int32)
    same_before = (ids[:, None] == ids[None, :]) & (i[None, :] < i[:, None])
    rank = tl.sum(same_before.to(tl.int64), 1)  # stable: earlier assignments first
    ok = valid & (ids >= 0) & (ids < E)
    base = tl.load(bases_ptr + ids.to(tl.int64) * NB + b, mask=ok, other=0)
    tl.store(order_ptr + base + rank, a.to(tl.int64), mask=ok)


def route(expert_idx_Tk: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of the flattened assignments by expert: (order (T*k,) int64, counts (E,) int64).

    Expert ids must lie in [0, num_experts). Three passes, all on the device: per-block
    histograms, an exclusive scan over (expert, block), and a scatter by in-block rank.
    """
    check_device(expert_idx_Tk)
    idx_A = expert_idx_Tk.reshape(-1).contiguous()
    A, E = idx_A.numel(), int(num_experts)
    order_A = torch.empty(A, dtype=torch.int64, device=idx_A.device)
    counts_E = torch.empty(E, dtype=torch.int64, device=idx_A.device)
    if E == 0:
        return order_A, counts_E
    if A == 0:
        return order_A, counts_E.zero_()
    NB = triton.cdiv(A, SORT_BLOCK)
    block_counts_EB = torch.empty(E, NB, dtype=torch.int32, device=idx_A.device)
    bases_EB = torch.empty(E, NB, dtype=torch.int64, device=idx_A.device)
    BLOCK_E = triton.next_power_of_2(E)
    BLOCK_B = min(triton.next_power_of_2(NB), 1024)
    _block_histogram_kernel[(NB,)](idx_A, block_counts_EB, A, E, NB, BLOCK=SORT_BLOCK,
                                   BLOCK_E=BLOCK_E)
    _expert_totals_kernel[(E,)](block_counts_EB, counts_E, NB, BLOCK_B=BLOCK_B)
    _block_bases_kernel[(E,)](block_counts_EB, counts_E, bases_EB, E, NB, BLOCK_E=BLOCK_E,
                              BLOCK_B=BLOCK_B)
    _route_scatter_kernel[(NB,)](idx_A, bases_EB, order_A, A, E, NB, BLOCK=SORT_BLOCK)
    return order_A, counts_E


# ---------------------------------------------------------------- gather / scatter
@_tuned(key=["D", "HAS_W"])
@triton.jit
def _gather_rows_kernel(x_ptr, order_ptr, w_ptr, out_ptr, M, D, top_k,
                        stride_xt, stride_om,
                        HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[m] = x[order[m] // k] (times w_flat[order[m]] when HAS_W)."""
    ms = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_ok = ms < M
    mask = m_ok[:, None] & (ds < D)[None, :]
    a = tl.load(order_ptr + ms, mask=m_ok, other=0)
    vals = tl.load(x_ptr + (a // top_k)[:, None] * stride_xt + ds[None, :], mask=mask, other=0.0)
    if HAS_W:
        wa = tl.load(w_ptr + a, mask=m_ok, other=0.0).to(tl.float32)
        vals = vals.to(tl.float32) * wa[:, None]
    tl.store(out_ptr + ms.to(tl.int64)[:, None] * stride_om + ds[None, :],
             vals.to(out_ptr.dtype.element_ty), mask=mask)


@_tuned(key=["D", "HAS_W", "TOP_K"])
@triton.jit
def _combine_rows_kernel(y_ptr, pos_ptr, w_ptr, out_ptr, T, D,
                         stride_ym, stride_ot,
                         TOP_K: tl.constexpr, HAS_W: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = sum_j w[t, j] * y[pos[t*k + j]] over kept assignments (w = 1 without HAS_W)."""
    ts = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = ts < T
    d_ok = ds < D
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        a = ts.to(tl.int64) * TOP_K + j
        p = tl.load(pos_ptr + a, mask=t_ok, other=-1)
        kept = p >= 0
        vals = tl.load(y_ptr + p[:, None] * stride_ym + ds[None, :],
                       mask=kept[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if HAS_W:
            wa = tl.load(w_ptr + a, mask=kept, other=0.0).to(tl.float32)
            vals = vals * wa[:, None]
        acc += vals
    tl.store(out_ptr + ts.to(tl.int64)[:, None] * stride_ot + ds[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _inverse_kernel(order_ptr, pos_ptr, M, BLOCK: tl.constexpr):
    """pos[order[m]] = m (pos was filled with -1, so dropped assignments stay -1)."""
    ms = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(order_ptr + ms, mask=ms < M, other=0)
    tl.store(pos_ptr + a, ms.to(tl.int64), mask=ms < M)


@triton.jit
def _weight_grad_kernel(dout_ptr, y_ptr, pos_ptr, dw_ptr, A, D, top_k,
                        stride_dt, stride_ym, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr):
    """dw[a] = <dout[a // k], y[pos[a]]>, and 0 for a dropped assignment."""
    as_ = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    a_ok = as_ < A
    p = tl.load(pos_ptr + as_, mask=a_ok, other=-1)
    kept = p >= 0
    t = as_ // top_k
    acc = tl.zeros((BLOCK_A,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        mask = kept[:, None] & (ds < D)[None, :]
        g = tl.load(dout_ptr + t[:, None] * stride_dt + ds[None, :], mask=mask, other=0.0)
        y = tl.load(y_ptr + p[:, None] * stride_ym + ds[None, :], mask=mask, other=0.0)
        acc += tl.sum(g.to(tl.float32) * y.to(tl.float32), 1)
    tl.store(dw_ptr + as_, acc.to(dw_ptr.dtype.element_ty), mask=a_ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2D tensor with unit column stride (rows may be strided)."""
    return t if t.stride(1) == 1 else t.contiguous()


def gather(x_TD: torch.Tensor, order_M: torch.Tensor, top_k: int,
           weights_Tk: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """(M, D) rows x[order // top_k] in expert order; scaled by weights.flat[order] if given."""
    x_TD = _rows(x_TD)
    M, D = order_M.shape[0], x_TD.shape[1]
    out_MD = out if out is not None else x_TD.new_empty(M, D)
    if M == 0 or D == 0:
        return out_MD
    w_A = weights_Tk.reshape(-1).contiguous() if weights_Tk is not None else x_TD
    check_device(x_TD, order_M)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_R"]), triton.cdiv(D, meta["BLOCK_D"]))

    _gather_rows_kernel[grid](x_TD, order_M.contiguous(), w_A, out_MD, M, D, top_k,
                              x_TD.stride(0), out_MD.stride(0), HAS_W=weights_Tk is not None,
                              **_interpreter_blocks(M, D))
    return out_MD


def inverse_order(order_M: torch.Tensor, num_assignments: int) -> torch.Tensor:
    """pos (A,) int64 with pos[order[m]] = m, and -1 for assignments missing from order."""
    check_device(order_M)
    pos_A = torch.full((num_assignments,), -1, dtype=torch.int64, device=order_M.device)
    M = order_M.shape[0]
    if M:
        _inverse_kernel[(triton.cdiv(M, 1024),)](order_M.contiguous(), pos_A, M, BLOCK=1024)
    return pos_A


def combine(y_MD: torch.Tensor, pos_A: torch.Tensor, num_tokens: int, top_k: int,
            weights_Tk: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """(T, D): out[t] = sum_j w[t, j] * y[pos[t*k + j]] over kept assignments (w = 1 if None)."""
    y_MD = _rows(y_MD)
    T, D = num_tokens, y_MD.shape[1]
    out_TD = out if out is not None else y_MD.new_empty(T, D)
    if T == 0 or D == 0:
        return out_TD
    w_A = weights_Tk.reshape(-1).contiguous() if weights_Tk is not None else y_MD
    check_device(y_MD, pos_A)

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_R"]), triton.cdiv(D, meta["BLOCK_D"]))

    _combine_rows_kernel[grid](y_MD, pos_A, w_A, out_TD, T, D, y_MD.stride(0), out_TD.stride(0),
                               TOP_K=top_k, HAS_W=weights_Tk is not None,
                               **_interpreter_blocks(T, D))
    return out_TD


def scatter(y_MD: torch.Tensor, order_M: torch.Tensor, weights_Tk: torch.Tensor,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """(T, D) back in token order with the combine: out[t] = sum_j w[t, j] * y[pos(t*k + j)]."""
    T, k = weights_Tk.shape
    return combine(y_MD, inverse_order(order_M, T * k), T, k, weights_Tk, out=out)


def gather_backward(dy_MD: torch.Tensor, order_M: torch.Tensor, num_tokens: int, top_k: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """dx (T, D) of `gather`: each token sums the gradients of its kept assignments."""
    pos_A = inverse_order(order_M, num_tokens * top_k)
    return combine(dy_MD, pos_A, num_tokens, top_k, out=out)


def scatter_backward(dout_TD: torch.Tensor, y_MD: torch.Tensor, order_M: torch.Tensor,
                     weights_Tk: torch.Tensor, out_dy: torch.Tensor | None = None,
                     out_dw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy (M, D), dweights (T, k)) of `scatter`: dy[m] = w.flat[order[m]] * dout[order[m] // k],
    dweights[t, j] = <dout[t], y[pos(t*k + j)]> (0 for dropped assignments)."""
    T, k = weights_Tk.shape
    dout_TD, y_MD = _rows(dout_TD), _rows(y_MD)
    dy_MD = gather(dout_TD, order_M, k, weights_Tk, out=out_dy)
    dw_Tk = out_dw if out_dw is not None else weights_Tk.new_empty(T, k)
    A, D = T * k, y_MD.shape[1]
    if A:
        pos_A = inverse_order(order_M, A)
        BLOCK_A = interpreter_block(A, 32, 128) if INTERPRET else 32
        BLOCK_D = 64 if INTERPRET else min(triton.next_power_of_2(max(D, 1)), 256)
        _weight_grad_kernel[(triton.cdiv(A, BLOCK_A),)](
            dout_TD, y_MD, pos_A, dw_Tk, A, D, k, dout_TD.stride(0), y_MD.stride(0),
            BLOCK_A=BLOCK_A, BLOCK_D=BLOCK_D)
    return dy_MD, dw_Tk
