"""Fused linear + cross-entropy: the LM head and its loss without the full (tokens x vocab) logits.

Legend: N tokens, D model width, V vocabulary, C tokens per chunk, R rows per block.

With a 100k vocabulary the logits dominate memory and, on a CPU, time: every elementwise pass over
(N, V) fp32 goes to DRAM. So the work goes in two levels. Chunks of C tokens bound the memory: a
chunk's logits and gradients exist in the compute dtype (bf16 under autocast) only, and the big
matmuls (logits, grad_h, grad_w) run per chunk. Within a chunk, blocks of R rows (about 4 MB of
fp32) do the softmax work while it sits in cache: `log_softmax` straight from the bf16 logits into
fp32 (one op), the target's log-probability, `exp_` in place, minus the one-hot, and one multiply
that writes the scaled gradient back in the compute dtype. The forward computes the gradients, so
the backward only scales what is already there. No (N, V) tensor ever exists, and on the CPU no
(C, V) fp32 one either (on a GPU the row blocks are whole chunks: launches cost more than passes).
"""

from __future__ import annotations

import torch

BLOCK_BYTES = 4 << 20  # fp32 softmax work per block: stays in L2/L3 between its passes


def rows_per_block(vocab: int) -> int:
    """Rows of fp32 logits that fit in `BLOCK_BYTES` (at least one)."""
    return max(1, BLOCK_BYTES // (4 * vocab))


class FusedLinearCrossEntropy(torch.autograd.Function):
    """mean_n CE(h_n @ W^T, y_n), computed chunk by chunk; gradients for h and W."""

    @staticmethod
    def forward(ctx, h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor,
                chunk: int, compute_dtype: torch.dtype, ignore_index: int, pad_to: int):
        N, V = h_ND.shape[0], w_VD.shape[0]
        pad = -V % pad_to  # padded vocabulary rows: zero weights, -inf logits, no gradient
        if pad:
            w_c = w_VD.new_zeros(V + pad, w_VD.shape[1], dtype=compute_dtype)
            w_c[:V] = w_VD
        else:
            w_c = w_VD.to(compute_dtype)
        h_c = h_ND.to(compute_dtype)
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)  # softmax in >= fp32
        valid_N = targets_N != ignore_index
        n_valid = valid_N.sum().clamp_min(1)
        safe_N1 = torch.where(valid_N, targets_N, 0)[:, None]
        scale_N1 = (valid_N.to(acc_dtype) / n_valid)[:, None]  # d loss / d logits, per row
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h_ND) if need_grad else None
        grad_w = None
        nll_N = torch.empty(N, dtype=acc_dtype, device=h_ND.device)
        # CPU: cache-sized blocks; GPU: the whole chunk at once (thousands of small blocks would
        # each pay kernel launches, and HBM bandwidth makes the extra passes cheap)
        R = rows_per_block(V) if h_ND.device.type == "cpu" else chunk
        minus_one_R1 = torch.full((R, 1), -1.0, dtype=acc_dtype, device=h_ND.device)
        for start in range(0, N, chunk):
            hc_CD = h_c[start:start + chunk]
            logits_CV = hc_CD @ w_c.t()  # compute dtype
            if pad:
                logits_CV[:, V:] = float("-inf")
            g_CV = torch.empty_like(logits_CV) if need_grad else None
            for r in range(0, logits_CV.shape[0], R):
                a, b = start + r, start + min(r + R, logits_CV.shape[0])
                logp_RV = torch.log_softmax(logits_CV[r:r + R], dim=-1, dtype=acc_dtype)
                nll_N[a:b] = -logp_RV.gather(1, safe_N1[a:b])[:, 0]
                if need_grad:
                    probs_RV = logp_RV.exp_()  # softmax, in place
                    probs_RV.scatter_add_(1, safe_N1[a:b], minus_one_R1[:b - a])  # - one-hot
                    g_CV[r:r + R] = probs_RV.mul_(scale_N1[a:b])  # into the compute dtype
            if need_grad:
                grad_h[start:start + chunk] = g_CV @ w_c
                part_VD = g_CV.t() @ hc_CD
                grad_w = part_VD.to(acc_dtype) if grad_w is None else grad_w.add_(part_VD)
        if need_grad:
            if grad_w is None:  # no tokens at all
                grad_w = torch.zeros(w_VD.shape, dtype=acc_dtype, device=w_VD.device)
            grad_w = grad_w[:V]
            ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w_VD.dtype
        return (nll_N * valid_N).sum() / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # the usual case (loss.backward() on this loss plus others, no accumulation scale): the
        # gradients as computed, without a pass over the (V, D) weight gradient
        if _is_cpu_one(grad_out):
            return grad_h, grad_w.to(ctx.w_dtype), None, None, None, None, None
        return grad_h * grad_out, (grad_w * grad_out).to(ctx.w_dtype), None, None, None, None, None


def _is_cpu_one(t: torch.Tensor) -> bool:
    """Whether t is a real CPU scalar equal to 1 (reading it costs no device sync; fake tensors,
    as in memory planning, and traced ones have no value to read)."""
    if t.device.type != "cpu" or t.numel() != 1 or torch.compiler.is_compiling():
        return False
    if torch._subclasses.fake_tensor.is_fake(t):
        return False
    return float(t) == 1.0


def fused_linear_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor,
                               chunk: int | None = None, ignore_index: int = -100,
                               pad_to: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `h @ w^T` against `targets`, never holding more than `chunk` rows
    of logits. Matmuls run in the autocast dtype when autocast is on, softmax in fp32.

    On a GPU (the defaults): chunks of 4096 rows, and the vocabulary padded to a multiple of
    128 inside the matmuls. cuBLAS has no Hopper kernel for a leading dimension like cl100k's
    100277 and falls back to far slower ones (experiments/results/gpu_h200_2026-11-26.md); the
    padded rows are zero and their logits -inf."""
    device_type = h_ND.device.type
    gpu = device_type == "cuda"
    chunk = chunk or (4096 if gpu else 1024)
    pad_to = pad_to or (128 if gpu else 1)
    if device_type == "meta":  # no autocast on meta (dry runs, planning): shapes only
        return FusedLinearCrossEntropy.apply(h_ND, w_VD, targets_N, chunk, h_ND.dtype,
                                             ignore_index, 1)
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = h_ND.dtype
    with torch.autocast(device_type, enabled=False):
        return FusedLinearCrossEntropy.apply(h_ND, w_VD, targets_N, chunk, compute_dtype,
                                             ignore_index, pad_to)
