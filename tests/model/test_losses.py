"""The fused LM-head cross-entropy against `F.cross_entropy` on materialised logits."""

import pytest
import torch
import torch.nn.functional as F

from moe_lm.model.losses import fused_linear_cross_entropy


@pytest.mark.parametrize("N, chunk, pad_to", [(7, 3, 1), (64, 64, 1), (33, 1024, 1), (33, 8, 128),
                                               (20, 64, 16)])
def test_fused_cross_entropy_matches_reference_with_ignored_targets(N, chunk, pad_to):
    """pad_to: the vocabulary padded inside the matmuls, as on a GPU (zero rows, -inf logits)."""
    h = torch.randn(N, 16, requires_grad=True, dtype=torch.float64)
    w = torch.randn(50, 16, requires_grad=True, dtype=torch.float64)
    y = torch.randint(0, 50, (N,))
    y[::5] = -100
    ref = F.cross_entropy(h @ w.t(), y, ignore_index=-100)
    got = fused_linear_cross_entropy(h, w, y, chunk=chunk, pad_to=pad_to)
    torch.testing.assert_close(got, ref)
    g = torch.randn(())
    torch.testing.assert_close(torch.autograd.grad(got * g, [h, w]),
                               torch.autograd.grad(ref * g, [h, w]))


def test_fused_cross_entropy_under_bf16_autocast_is_close_to_fp32():
    h = torch.randn(40, 32)
    w = torch.randn(100, 32) * 0.1
    y = torch.randint(0, 100, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_linear_cross_entropy(h, w, y, chunk=16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, F.cross_entropy(h @ w.t(), y), rtol=2e-2, atol=2e-2)


def test_fused_cross_entropy_unscaled_backward_twice_with_retained_graph():
    """grad_out == 1 returns the saved gradients without a copy: a second backward through the
    retained graph must still see them unchanged, also after .grad was zeroed in place (what
    `zero_grad(set_to_none=False)` does) and after gradients accumulated."""
    h = torch.randn(12, 16, requires_grad=True, dtype=torch.float64)
    w = torch.randn(30, 16, requires_grad=True, dtype=torch.float64)
    y = torch.randint(0, 30, (12,))
    got = fused_linear_cross_entropy(h, w, y, chunk=5)
    ref = F.cross_entropy(h @ w.t(), y)
    want = torch.autograd.grad(ref, [h, w])
    got.backward(retain_graph=True)
    torch.testing.assert_close((h.grad, w.grad), want)
    h.grad.zero_()
    w.grad.zero_()
    got.backward(retain_graph=True)
    torch.testing.assert_close((h.grad, w.grad), want)
    got.backward()
    torch.testing.assert_close((h.grad, w.grad), tuple(2 * g for g in want))
