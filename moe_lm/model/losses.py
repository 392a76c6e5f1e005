"""Fused linear + cross-entropy: the LM head and its loss without the full (tokens x vocab) logits.

Legend: N tokens, D model width, V vocabulary, C tokens per chunk.

With a 100k vocabulary the logits dominate memory and, on a CPU, time: every elementwise pass over
(N, V) fp32 goes to DRAM. Chunks of C tokens keep each chunk's logits in cache; the forward also
computes the gradients (softmax - one-hot), so the backward only scales what is already there.
"""

from __future__ import annotations

import torch


class FusedLinearCrossEntropy(torch.autograd.Function):
    """mean_n CE(h_n @ W^T, y_n), computed chunk by chunk; gradients for h and W."""

    @staticmethod
    def forward(ctx, h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor,
                chunk: int, compute_dtype: torch.dtype, ignore_index: int):
        N = h_ND.shape[0]
        w_c = w_VD.to(compute_dtype)
        h_c = h_ND.to(compute_dtype)
        valid_N = targets_N != ignore_index
        n_valid = valid_N.sum().clamp_min(1)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h_ND) if need_grad else None
        grad_w = torch.zeros(w_VD.shape, dtype=torch.promote_types(compute_dtype, torch.float32),
                             device=w_VD.device) if need_grad else None
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)  # softmax in >= fp32
        total = torch.zeros((), dtype=acc_dtype, device=h_ND.device)
        for start in range(0, N, chunk):
            hc_CD = h_c[start:start + chunk]
            y_C = targets_N[start:start + chunk]
            ok_C = valid_N[start:start + chunk]
            safe_y_C = torch.where(ok_C, y_C, 0)
            logits_CV = (hc_CD @ w_c.t()).to(acc_dtype)
            lse_C = torch.logsumexp(logits_CV, dim=-1)
            target_logit_C = logits_CV.gather(1, safe_y_C[:, None])[:, 0]
            total += ((lse_C - target_logit_C) * ok_C).sum()
            if need_grad:
                probs_CV = logits_CV.sub_(lse_C[:, None]).exp_()  # softmax, in place
                probs_CV[torch.arange(len(y_C), device=y_C.device), safe_y_C] -= 1.0
                probs_CV.mul_((ok_C.to(acc_dtype) / n_valid)[:, None])
                g_CV = probs_CV.to(compute_dtype)
                grad_h[start:start + chunk] = (g_CV @ w_c).to(h_ND.dtype)
                grad_w += (g_CV.t() @ hc_CD).to(grad_w.dtype)
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w_VD.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, (grad_w * grad_out).to(ctx.w_dtype), None, None, None, None


def fused_linear_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor,
                               chunk: int = 1024, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of `h @ w^T` against `targets`, never holding more than `chunk` rows
    of logits. Matmuls run in the autocast dtype when autocast is on, softmax in fp32."""
    device_type = h_ND.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = h_ND.dtype
    with torch.autocast(device_type, enabled=False):
        return FusedLinearCrossEntropy.apply(h_ND, w_VD, targets_N, chunk, compute_dtype,
                                             ignore_index)
