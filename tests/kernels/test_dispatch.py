"""Triton route / gather / scatter and their backward launchers against moe_lm.ops.reference.

Legend: T tokens, k assignments per token, E experts, D width, M kept assignments (<= T*k).
Outputs are poisoned with NaN (or -7 for integers) before each call.
"""

from __future__ import annotations

import pytest
import torch

from moe_lm import kernels
from moe_lm.ops import reference

# (T, k, E, D): D is never a multiple of a block size; E covers 1, 4, 8 and 64.
SHAPES = [(1, 1, 1, 3), (37, 2, 4, 70), (130, 3, 8, 33), (150, 2, 64, 17), (200, 1, 4, 5)]
DTYPES = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not kernels.INTERPRET,
                                                 reason="CPU needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available() or kernels.INTERPRET, reason="needs CUDA, no interpreter")]),
]
IDS = [f"T{t}k{k}E{e}D{d}" for t, k, e, d in SHAPES]


def _skewed_idx(T: int, k: int, E: int, device: str) -> torch.Tensor:
    """Expert ids with a hot expert, and (for E > 2) an expert that gets nothing."""
    idx = torch.randint(0, E, (T, k), device=device)
    hot = torch.rand(T, k, device=device) < 0.4
    idx = torch.where(hot, torch.zeros_like(idx), idx)
    if E > 2:
        idx[idx == E - 1] = 1
    return idx


def _order(T, k, E, subset, device):
    """A route order; with `subset`, a stable-within-expert subset as capacity dropping gives."""
    order, _ = reference.route(_skewed_idx(T, k, E, device), E)
    if subset:
        keep = torch.rand(order.shape[0], device=device) < 0.7
        order = order[keep]
    return order


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,k,E,D", SHAPES, ids=IDS)
def test_route_is_a_stable_sort_with_counts(T, k, E, D, device):
    idx = _skewed_idx(T, k, E, device)
    order, counts = kernels.route(idx, E)
    ref_order, ref_counts = reference.route(idx, E)
    assert order.dtype == ref_order.dtype and counts.dtype == ref_counts.dtype
    assert torch.equal(order, ref_order)
    assert torch.equal(counts, ref_counts)


@pytest.mark.parametrize("device", DEVICES)
def test_route_handles_many_sort_blocks_and_no_tokens(device):
    idx = torch.randint(0, 5, (700, 2), device=device)  # 1400 assignments: 11 sort blocks
    assert torch.equal(kernels.route(idx, 5)[0], reference.route(idx, 5)[0])
    order, counts = kernels.route(torch.zeros(0, 2, dtype=torch.long, device=device), 3)
    assert order.shape == (0,) and torch.equal(counts, torch.zeros(3, dtype=torch.long,
                                                                   device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("subset", [False, True], ids=["all", "dropped"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,k,E,D", SHAPES, ids=IDS)
def test_gather_and_backward_match_reference(T, k, E, D, dtype, subset, device):
    order = _order(T, k, E, subset, device)
    M = order.shape[0]
    x = torch.randn(T, D, device=device).to(dtype)
    y = kernels.gather(x, order, k, out=torch.full((M, D), float("nan"), dtype=dtype,
                                                    device=device))
    x_ref = x.clone().requires_grad_()
    y_ref = reference.gather(x_ref, order, k)
    assert torch.equal(y, y_ref)  # a copy is exact

    dy = torch.randn(M, D, device=device).to(dtype)
    y_ref.backward(dy)
    dx = kernels.gather_backward(dy, order, T, k, out=torch.full((T, D), float("nan"),
                                                                 dtype=dtype, device=device))
    torch.testing.assert_close(dx, x_ref.grad, **DTYPES[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("subset", [False, True], ids=["all", "dropped"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,k,E,D", SHAPES, ids=IDS)
def test_scatter_and_backward_match_reference(T, k, E, D, dtype, subset, device):
    order = _order(T, k, E, subset, device)
    M = order.shape[0]
    y = torch.randn(M, D, device=device).to(dtype)
    w = torch.rand(T, k, device=device)  # router weights stay fp32
    nan = float("nan")
    out = kernels.scatter(y, order, w, out=torch.full((T, D), nan, dtype=dtype, device=device))
    y_ref, w_ref = y.float().requires_grad_(), w.clone().requires_grad_()
    out_ref = reference.scatter(y_ref, order, w_ref)
    torch.testing.assert_close(out.float(), out_ref, **DTYPES[dtype])

    dout = torch.randn(T, D, device=device).to(dtype)
    out_ref.backward(dout.float())
    dy, dw = kernels.scatter_backward(
        dout, y, order, w, out_dy=torch.full((M, D), nan, dtype=dtype, device=device),
        out_dw=torch.full((T, k), nan, device=device))
    torch.testing.assert_close(dy.float(), y_ref.grad, **DTYPES[dtype])
    torch.testing.assert_close(dw, w_ref.grad, atol=1e-4 if dtype == torch.float32 else 5e-2,
                               rtol=1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_inverse_order_marks_dropped_assignments(device):
    order = torch.tensor([4, 0, 2], device=device)
    pos = kernels.inverse_order(order, 6)
    assert pos.tolist() == [1, -1, 2, -1, 0, -1]
