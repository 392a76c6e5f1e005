"""The torch backend's dropless dispatch (full permutations) against plain indexing, in float64."""

from __future__ import annotations

import pytest
import torch

from moe_lm.ops import torch_dropless, torch_backend

# the combine's two implementations: embedding_bag (CPU tensors) and row gather + bmm (GPU)
COMBINES = pytest.mark.parametrize("embedding_bag", [True, False], ids=["embedding_bag", "bmm"])


def combine(y_MD, order_M, w_Tk, embedding_bag):
    return torch_dropless.CombinePermuted.apply(y_MD, order_M, w_Tk, embedding_bag)


@COMBINES
@pytest.mark.parametrize("T,k,E,D", [(1, 1, 1, 3), (37, 2, 4, 8), (64, 3, 8, 5)])
def test_dropless_gather_and_scatter_match_indexing_with_gradients(T, k, E, D, embedding_bag):
    gen = torch.Generator().manual_seed(T * 7 + k)
    idx_Tk = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    order_M, counts_E = torch_backend.route(idx_Tk, E)
    assert torch.equal(counts_E, torch.bincount(idx_Tk.flatten(), minlength=E))
    x = torch.randn(T, D, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, generator=gen, requires_grad=True)

    x_MD = torch_backend.gather(x, order_M, k)
    y_MD = x_MD * torch.linspace(0.5, 2.0, D, dtype=torch.float64)  # any per-row function
    out = combine(y_MD, order_M, w, embedding_bag)
    torch.testing.assert_close(out, torch_backend.scatter(y_MD, order_M, w))  # the device's choice

    x_ref = x.detach().clone().requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    x_MD_ref = x_ref[order_M // k]
    y_ref = x_MD_ref * torch.linspace(0.5, 2.0, D, dtype=torch.float64)
    y_TkD = torch.empty_like(y_ref).index_put((order_M,), y_ref).view(T, k, D)
    out_ref = (y_TkD * w_ref.unsqueeze(-1)).sum(1)

    torch.testing.assert_close(x_MD, x_MD_ref)
    torch.testing.assert_close(out, out_ref)
    g = torch.randn(T, D, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(torch.autograd.grad(out, [x, w], g),
                               torch.autograd.grad(out_ref, [x_ref, w_ref], g))


@COMBINES
def test_dropless_dispatch_passes_gradcheck(embedding_bag):
    idx_Tk = torch.tensor([[0, 2], [1, 0], [2, 1]])
    order_M, _ = torch_backend.route(idx_Tk, 3)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w: combine(torch_backend.gather(x, order_M, 2).sin(), order_M, w, embedding_bag),
        (x, w))


@COMBINES
def test_dropless_combine_weight_gradient_keeps_logical_order_for_strided_weights(embedding_bag):
    idx_Tk = torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0], [2, 1]])
    T, k, D = 6, 2, 4
    order_M, _ = torch_backend.route(idx_Tk, 3)
    y = torch.randn(T * k, D, dtype=torch.float64)
    w_kT = torch.rand(k, T, dtype=torch.float64, requires_grad=True)
    out = combine(y, order_M, w_kT.t(), embedding_bag)  # (T, k) weights, transposed strides
    g = torch.randn(T, D, dtype=torch.float64)
    (grad_kT,) = torch.autograd.grad(out, [w_kT], g)
    y_TkD = torch.empty_like(y).index_put((order_M,), y).view(T, k, D)
    torch.testing.assert_close(grad_kT, (y_TkD * g.unsqueeze(1)).sum(-1).t())


def test_dropless_gather_gradient_in_bfloat16_rounds_like_autograds_sum():
    """The gather's backward sums each token's k row gradients: in bf16 exactly what autograd's
    sum of the repeated rows gives (round to nearest even), not a biased rounding of ties."""
    gen = torch.Generator().manual_seed(5)
    T, k, E, D = 512, 2, 8, 64
    idx_Tk = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    order_M, _ = torch_backend.route(idx_Tk, E)
    x = torch.randn(T, D, generator=gen).bfloat16().requires_grad_()
    g_MD = torch.randn(T * k, D, generator=gen).bfloat16()
    (got,) = torch.autograd.grad(torch_backend.gather(x, order_M, k), x, g_MD)
    g_TkD = torch.empty_like(g_MD).index_copy_(0, order_M, g_MD).view(T, k, D)
    want = (g_TkD[:, 0].float() + g_TkD[:, 1].float()).bfloat16()  # exact sum, rounded once
    assert torch.equal(got, want)
