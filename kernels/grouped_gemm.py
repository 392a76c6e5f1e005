"""Triton grouped GEMM: `torch._grouped_mm` semantics for 2D x 3D, with both backward products.

Legend: T rows (tokens in expert order), K reduction width, N output width, E experts (groups);
offs_E holds the cumulative end row of each group (int32). Rows past offs[E-1] belong to no group
and get zeros in the forward output (the reference does the same).

Scheduling (kernels/schedule.py): the kernels are persistent, one program per SM, each walking
a flat tile table with `tl.range(pid, num_tiles, NUM_SMS)`. The forward and dX products walk
(row tile, column tile) pairs of the row-tile table that `row_tiles` writes on the device from
`offs` (the host never reads it; empty groups own no tiles); dW walks (expert, output tile)
pairs, the most loaded experts first. BLOCK_M comes from `choose_tiles` (rows per expert), since
the row-tile table is built for it; the autotuner, when on, picks BLOCK_N, BLOCK_K, warps, stages.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import AUTOTUNE, INTERPRET, check_device, dot_precision, interpreter_block
from .schedule import choose_tiles, expert_order, num_programs, row_tiles, tma_ready


def _mm_configs() -> list[triton.Config]:
    """Hopper-oriented (BLOCK_N, BLOCK_K, warps, stages) for the autotuner; BLOCK_M is the
    launcher's (`choose_tiles`), since the row-tile table is built for it."""
    shapes = [(256, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 4), (256, 64, 4, 3),
              (64, 64, 4, 4), (128, 32, 4, 5)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for n, k, w, s in shapes]


def _tuned(key: list[str]):
    """`triton.autotune` on the GPU with MOE_LM_KERNEL_AUTOTUNE=1; otherwise (and under the
    interpreter) the launcher passes the blocks itself."""
    if INTERPRET or not AUTOTUNE:
        return lambda kernel: kernel
    return triton.autotune(configs=_mm_configs(), key=key)


def _blocks(M: int, E: int, K: int, N: int, dtype: torch.dtype) -> tuple[int, dict]:
    """(BLOCK_M, launch kwargs): small blocks under the interpreter (test shapes exercise
    masked edges and multi-tile loops), `choose_tiles` on the GPU (the autotuner picks the rest
    when it is on)."""
    if INTERPRET:
        bm = interpreter_block(M, 16, 64, 512)
        return bm, {"BLOCK_N": interpreter_block(N, 32, 128, 160),
                    "BLOCK_K": interpreter_block(K, 16, 128, 160)}
    cfg = choose_tiles(M, E, K, N, dtype)
    if AUTOTUNE:
        return cfg.block_m, {}
    return cfg.block_m, {"BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                         "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


@_tuned(key=["N", "K", "BLOCK_M", "PRECISION", "TMA", "W_NK"])
@triton.jit
def _grouped_mm_kernel(
    x_ptr, w_ptr, y_ptr, tiles_ptr, count_ptr,
    K, N, E,
    stride_xt, stride_xk, stride_we, stride_wk, stride_wn, stride_yt, stride_yn,
    T, NUM_SMS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    TMA: tl.constexpr, W_NK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[rows of group e] = x[rows of group e] @ w[e]: persistent over (row tile, column tile)
    pairs of the flat row-tile table; group E (the tail) stores zeros.

    TMA: x and w are read through tensor descriptors built once per program: one 2D over all
    rows of x, one 3D over w ((E, K, N), or its (E, N, K) memory when W_NK, as for dX). Their
    out-of-bounds zero fill replaces the K mask; rows of the next group that a ragged tile reads
    are dropped by the masked store (the epilogue is the only mask)."""
    pid = tl.program_id(0)
    num_n = (N + BLOCK_N - 1) // BLOCK_N  # plain arithmetic: nested jit calls are slow to interpret
    num_work = tl.load(count_ptr) * num_n
    ks = tl.arange(0, BLOCK_K)
    if TMA:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[T, K], strides=[stride_xt, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        if W_NK:
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E, N, K],
                                               strides=[stride_we, stride_wn, 1],
                                               block_shape=[1, BLOCK_N, BLOCK_K])
        else:
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E, K, N],
                                               strides=[stride_we, stride_wk, 1],
                                               block_shape=[1, BLOCK_K, BLOCK_N])
    for work in tl.range(pid, num_work, NUM_SMS):
        tile_m = work // num_n  # column tiles of one row tile run back to back: x stays in L2
        pid_n = work % num_n
        group = tl.load(tiles_ptr + tile_m * 3)
        row_start = tl.load(tiles_ptr + tile_m * 3 + 1)
        row_end = tl.load(tiles_ptr + tile_m * 3 + 2)

        rows = row_start + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = rows < row_end
        mask_n = cols < N
        k_tiles = tl.where(group < E, (K + BLOCK_K - 1) // BLOCK_K, 0)  # the tail: no loop
        w_group = tl.minimum(group, E - 1).to(tl.int64)
        x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xt + ks[None, :] * stride_xk
        w_ptrs = (w_ptr + w_group * stride_we + ks[:, None] * stride_wk
                  + cols.to(tl.int64)[None, :] * stride_wn)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(0, k_tiles):
            if TMA:
                a = x_desc.load([row_start, kt * BLOCK_K])
                if W_NK:
                    b = tl.trans(w_desc.load([group, pid_n * BLOCK_N, kt * BLOCK_K])
                                 .reshape(BLOCK_N, BLOCK_K))
                else:
                    b = w_desc.load([group, kt * BLOCK_K, pid_n * BLOCK_N]).reshape(BLOCK_K,
                                                                                     BLOCK_N)
            else:
                k_ok = (kt * BLOCK_K + ks) < K
                a = tl.load(x_ptrs, mask=mask_m[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=k_ok[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:  # the interpreter's bf16/fp16 tl.dot is wrong (triton 3.x); fp32 is exact
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

        y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_yt + cols[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@_tuned(key=["K", "N", "BLOCK_M", "PRECISION", "TMA"])
@triton.jit
def _grouped_mm_dw_kernel(
    x_ptr, dy_ptr, dw_ptr, offs_ptr, experts_ptr,
    T, K, N, E,
    stride_xt, stride_xk, stride_dyt, stride_dyn, stride_we, stride_wk, stride_wn,
    NUM_SMS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dw[e] = x_e^T @ dy_e, a reduction over expert e's rows: persistent over the flat
    (expert, output tile) table, most loaded experts first; empty experts store zeros.

    TMA: both operands are read row-major through descriptors over expert e's rows only, so
    the zero fill past the expert's end replaces the ragged-tail mask of every step."""
    pid = tl.program_id(0)
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    per_expert = ((K + BLOCK_K - 1) // BLOCK_K) * num_n
    ms = tl.arange(0, BLOCK_M)
    for t in tl.range(pid, E * per_expert, NUM_SMS):
        e = tl.load(experts_ptr + t // per_expert)
        out_tile = t % per_expert
        pid_k = out_tile // num_n
        pid_n = out_tile % num_n
        row_end = tl.minimum(tl.load(offs_ptr + e), T)
        row_start = tl.minimum(tl.load(offs_ptr + e - 1, mask=e > 0, other=0), T)
        m_tiles = (tl.maximum(row_end - row_start, 0) + BLOCK_M - 1) // BLOCK_M  # 0 if empty

        ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_k = ks < K
        mask_n = cols < N
        rows0 = row_start.to(tl.int64) + ms
        xt_ptrs = x_ptr + ks[:, None] * stride_xk + rows0[None, :] * stride_xt  # (BK, BM)
        dy_ptrs = dy_ptr + rows0[:, None] * stride_dyt + cols[None, :] * stride_dyn  # (BM, BN)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        if TMA:  # at least one row: a TMA box may not be empty (no load reads it then)
            n_rows = tl.maximum(row_end - row_start, 1)
            x_desc = tl.make_tensor_descriptor(x_ptr + row_start.to(tl.int64) * stride_xt,
                                               shape=[n_rows, K], strides=[stride_xt, 1],
                                               block_shape=[BLOCK_M, BLOCK_K])
            dy_desc = tl.make_tensor_descriptor(dy_ptr + row_start.to(tl.int64) * stride_dyt,
                                                shape=[n_rows, N], strides=[stride_dyt, 1],
                                                block_shape=[BLOCK_M, BLOCK_N])
        for mt in range(0, m_tiles):
            if TMA:
                a = tl.trans(x_desc.load([mt * BLOCK_M, pid_k * BLOCK_K]))
                b = dy_desc.load([mt * BLOCK_M, pid_n * BLOCK_N])
            else:
                m_ok = (row_start + mt * BLOCK_M + ms) < row_end
                a = tl.load(xt_ptrs, mask=mask_k[:, None] & m_ok[None, :], other=0.0)
                b = tl.load(dy_ptrs, mask=m_ok[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:  # the interpreter's bf16/fp16 tl.dot is wrong (triton 3.x); fp32 is exact
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            xt_ptrs += BLOCK_M * stride_xt
            dy_ptrs += BLOCK_M * stride_dyt

        dw_ptrs = (dw_ptr + e.to(tl.int64) * stride_we + ks[:, None] * stride_wk
                   + cols[None, :] * stride_wn)
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty),
                 mask=mask_k[:, None] & mask_n[None, :])


def _check(x_TK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    if x_TK.dim() != 2 or w_EKN.dim() != 3 or offs_E.dim() != 1:
        raise ValueError(f"grouped_mm wants x (T, K), w (E, K, N), offs (E,); got "
                         f"{tuple(x_TK.shape)}, {tuple(w_EKN.shape)}, {tuple(offs_E.shape)}")
    if x_TK.shape[1] != w_EKN.shape[1] or offs_E.shape[0] != w_EKN.shape[0]:
        raise ValueError(f"grouped_mm shape mismatch: x {tuple(x_TK.shape)}, "
                         f"w {tuple(w_EKN.shape)}, offs {tuple(offs_E.shape)}")
    if x_TK.dtype != w_EKN.dtype:
        raise ValueError(f"grouped_mm wants one dtype; got x {x_TK.dtype}, w {w_EKN.dtype}")
    check_device(x_TK, w_EKN, offs_E)
    return offs_E.to(torch.int32)  # no-op when already int32; never synchronizes


def grouped_mm(x_TK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """y (T, N): rows offs[e-1]:offs[e] of x times w[e]; rows past offs[-1] are zero.

    Any strides are accepted (a transposed `w` costs nothing), so `dx = dy @ w[e]^T` is
    `grouped_mm(dy, w.transpose(1, 2), offs)`. `out`, if given, is written in place.
    """
    offs_E = _check(x_TK, w_EKN, offs_E)
    T, K = x_TK.shape
    E, _, N = w_EKN.shape
    y_TN = out if out is not None else x_TK.new_empty(T, N)
    if T == 0 or N == 0:
        return y_TN
    if E == 0:
        return y_TN.zero_()

    block_m, blocks = _blocks(T, E, K, N, x_TK.dtype)
    tiles, count = row_tiles(offs_E, T, block_m)
    num_sms = num_programs(x_TK.device, INTERPRET)
    tma = K > 0 and tma_ready(x_TK) and (tma_ready(w_EKN) or tma_ready(w_EKN.transpose(1, 2)))
    _grouped_mm_kernel[(num_sms,)](
        x_TK, w_EKN, y_TN, tiles, count, K, N, E,
        x_TK.stride(0), x_TK.stride(1), w_EKN.stride(0), w_EKN.stride(1), w_EKN.stride(2),
        y_TN.stride(0), y_TN.stride(1), T,
        NUM_SMS=num_sms, PRECISION=dot_precision(x_TK.dtype), UPCAST=INTERPRET,
        TMA=tma, W_NK=tma and not tma_ready(w_EKN), BLOCK_M=block_m, **blocks,
    )
    return y_TN


def grouped_mm_dx(dy_TN: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """dx (T, K) = dy_e @ w[e]^T per group: the forward kernel over the transposed weight view."""
    return grouped_mm(dy_TN, w_EKN.transpose(1, 2), offs_E, out=out)


def grouped_mm_dw(x_TK: torch.Tensor, dy_TN: torch.Tensor, offs_E: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """dw (E, K, N): dw[e] = x_e^T @ dy_e; empty groups get zeros. `out` is written in place."""
    offs_E = offs_E.to(torch.int32)
    T, K = x_TK.shape
    N = dy_TN.shape[1]
    E = offs_E.shape[0]
    if dy_TN.shape[0] != T or x_TK.dtype != dy_TN.dtype:
        raise ValueError(f"grouped_mm_dw: x {tuple(x_TK.shape)} {x_TK.dtype} and dy "
                         f"{tuple(dy_TN.shape)} {dy_TN.dtype} disagree")
    check_device(x_TK, dy_TN, offs_E)
    dw_EKN = out if out is not None else x_TK.new_empty(E, K, N)
    if E == 0 or K == 0 or N == 0:
        return dw_EKN

    block_m, blocks = _blocks(T, E, K, N, x_TK.dtype)
    num_sms = num_programs(x_TK.device, INTERPRET)
    _grouped_mm_dw_kernel[(num_sms,)](
        x_TK, dy_TN, dw_EKN, offs_E, expert_order(offs_E, T), T, K, N, E,
        x_TK.stride(0), x_TK.stride(1), dy_TN.stride(0), dy_TN.stride(1),
        dw_EKN.stride(0), dw_EKN.stride(1), dw_EKN.stride(2),
        NUM_SMS=num_sms, PRECISION=dot_precision(x_TK.dtype), UPCAST=INTERPRET,
        TMA=T > 0 and tma_ready(x_TK) and tma_ready(dy_TN), BLOCK_M=block_m, **blocks,
    )
    return dw_EKN
