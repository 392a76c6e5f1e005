"""Triton grouped GEMM (forward, dx, dw) against the per-expert loop of moe_lm.ops.reference.

Legend: T rows, K reduction width, N output width, E groups; sizes_E rows per group.
Outputs are poisoned with NaN before each call, so an element the kernel forgets cannot pass.
"""

from __future__ import annotations

import pytest
import torch

from moe_lm import kernels
from moe_lm.ops.reference import grouped_mm as reference_grouped_mm

# (name, rows per group, rows past the last group, K, N): skewed, empty and single-row groups,
# widths that are not multiples of any block size.
SHAPES = [
    ("e1", [37], 0, 45, 70),
    ("e4_skewed", [0, 1, 50, 3], 0, 33, 17),
    ("e4_all_empty_but_one", [0, 0, 1, 0], 0, 19, 23),
    ("e8_empties", [0, 0, 20, 1, 0, 64, 7, 0], 0, 64, 96),
    ("e8_tail_rows", [5, 0, 9, 1, 0, 0, 2, 3], 6, 31, 40),
    ("e64_skewed", None, 0, 24, 40),
]
DTYPES = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=6e-2, rtol=2e-2),
          torch.float16: dict(atol=1e-2, rtol=5e-3)}
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not kernels.INTERPRET,
                                                 reason="CPU needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available() or kernels.INTERPRET, reason="needs CUDA, no interpreter")]),
]


def _sizes(spec: list[int] | None) -> list[int]:
    if spec is not None:
        return spec
    sizes = torch.randint(0, 5, (64,))  # 64 experts, many empty, one hot expert
    sizes[torch.rand(64) < 0.4] = 0
    sizes[3], sizes[40] = 40, 1
    return sizes.tolist()


def _problem(spec, tail, K, N, dtype, device):
    sizes = _sizes(spec)
    T = sum(sizes) + tail
    offs = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)
    x = torch.randn(T, K, device=device).to(dtype)
    w = (torch.randn(len(sizes), K, N, device=device) / K**0.5).to(dtype)
    return x, w, offs


def _nan(*shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name,spec,tail,K,N", SHAPES, ids=[s[0] for s in SHAPES])
def test_grouped_mm_matches_loop_forward_and_backward(name, spec, tail, K, N, dtype, device):
    x, w, offs = _problem(spec, tail, K, N, dtype, device)
    T, E = x.shape[0], w.shape[0]
    tol = DTYPES[dtype]

    y = kernels.grouped_mm(x, w, offs, out=_nan(T, N, dtype=dtype, device=device))
    x_ref = x.float().requires_grad_()
    w_ref = w.float().requires_grad_()
    y_ref = reference_grouped_mm(x_ref, w_ref, offs)
    torch.testing.assert_close(y.float(), y_ref, **tol)

    dy = torch.randn(T, N, device=device).to(dtype)
    y_ref.backward(dy.float())
    dx = kernels.grouped_mm_dx(dy, w, offs, out=_nan(T, K, dtype=dtype, device=device))
    dw = kernels.grouped_mm_dw(x, dy, offs, out=_nan(E, K, N, dtype=dtype, device=device))
    x_grad = x_ref.grad.clone()
    x_grad[int(offs[-1]):] = 0  # rows in no group: the loop's zero-fill has no gradient path
    torch.testing.assert_close(dx.float(), x_grad, **tol)
    torch.testing.assert_close(dw.float(), w_ref.grad, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_mm_accepts_strided_operands(device):
    x, w, offs = _problem([3, 0, 17, 1], 0, 40, 24, torch.float32, device)
    x_strided = torch.randn(x.shape[1], x.shape[0], device=device).t()  # column-major
    x_strided.copy_(x)
    w_t = w.transpose(1, 2).contiguous().transpose(1, 2)  # same values, (E, N, K) memory
    y = kernels.grouped_mm(x_strided, w_t, offs)
    torch.testing.assert_close(y, reference_grouped_mm(x, w, offs), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_mm_handles_no_rows_and_all_empty_groups(device):
    x = torch.randn(0, 8, device=device)
    w = torch.randn(3, 8, 5, device=device)
    offs = torch.zeros(3, dtype=torch.int32, device=device)
    assert kernels.grouped_mm(x, w, offs).shape == (0, 5)
    dw = kernels.grouped_mm_dw(x, torch.randn(0, 5, device=device), offs,
                               out=_nan(3, 8, 5, dtype=torch.float32, device=device))
    assert torch.equal(dw, torch.zeros_like(dw))


def test_grouped_mm_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape mismatch"):
        kernels.grouped_mm(torch.randn(4, 8), torch.randn(2, 7, 3), torch.tensor([2, 4]))
    with pytest.raises(ValueError, match="one dtype"):
        kernels.grouped_mm(torch.randn(4, 8), torch.randn(2, 8, 3).double(),
                           torch.tensor([2, 4]))
