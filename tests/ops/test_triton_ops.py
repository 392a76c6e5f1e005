"""The `triton` backend (custom ops over moe_lm.kernels) against moe_lm.ops.reference.

Legend: T tokens, k assignments per token, M kept assignments, E experts, D model width,
F expert hidden width. Checks forward values and gradients of every op, a whole MoE expert
block, fake/meta tensors, torch.compile, and the errors users see when a backend cannot run.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.library import opcheck

from moe_lm import kernels
from moe_lm.errors import ConfigError
from moe_lm.ops import get_backend, reference, triton_ops

CUDA_OK = torch.cuda.is_available() and not kernels.INTERPRET
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not kernels.INTERPRET,
                                                 reason="CPU needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not CUDA_OK, reason="needs CUDA, no interpreter")]),
]
# (T, k, E, D, F): E in {1, 4, 8, 64}; widths that are not multiples of any block size.
SHAPES = [(9, 1, 1, 20, 36), (37, 2, 4, 24, 40), (64, 2, 8, 17, 30), (96, 3, 64, 16, 24)]
IDS = [f"T{t}k{k}E{e}" for t, k, e, _, _ in SHAPES]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=8e-2, rtol=5e-2)}


def _routing(T, k, E, device):
    """Skewed expert ids (a hot expert, one that gets nothing) and router weights."""
    idx = torch.randint(0, E, (T, k), device=device)
    idx = torch.where(torch.rand(T, k, device=device) < 0.4, torch.zeros_like(idx), idx)
    if E > 2:
        idx[idx == E - 1] = 1
    weights = torch.softmax(torch.randn(T, k, device=device), -1)
    return idx, weights


@pytest.fixture(autouse=True)
def _poison_fresh_tensors():
    """Deterministic mode fills every torch.empty with NaN: an output element a kernel forgets
    to write cannot pass (the kernels' own tests also pass NaN-filled `out=` buffers)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(previous)


def _experts(B, x, idx, weights, w1, w2, E, drop):
    """route -> gather -> grouped_mm -> silu -> grouped_mm -> scatter, through backend B."""
    T, k = idx.shape
    order, counts = B.route(idx, E)
    if drop:  # keep every other assignment of each expert: a stable subset, as capacity drops
        keep = torch.arange(order.shape[0], device=order.device) % 2 == 0
        order = order[keep]
        counts = torch.bincount(idx.reshape(-1)[order], minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    h = B.gather(x, order, k)
    h = torch.nn.functional.silu(B.grouped_mm(h, w1, offs))
    return B.scatter(B.grouped_mm(h, w2, offs), order, weights)


def _leaves(T, D, F, E, dtype, device):
    x = torch.randn(T, D, device=device).to(dtype)
    w1 = (torch.randn(E, D, F, device=device) / D**0.5).to(dtype)
    w2 = (torch.randn(E, F, D, device=device) / F**0.5).to(dtype)
    return x, w1, w2


def _grads(B, leaves, idx, weights, E, drop, dout):
    leaves = [t.detach().clone().requires_grad_() for t in (*leaves, weights)]
    x, w1, w2, wts = leaves
    out = _experts(B, x, idx, wts, w1, w2, E, drop)
    out.backward(dout)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("drop", [False, True], ids=["dropless", "dropped"])
@pytest.mark.parametrize("dtype", list(TOL), ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,k,E,D,F", SHAPES, ids=IDS)
def test_expert_block_matches_reference_values_and_gradients(T, k, E, D, F, dtype, drop,
                                                                 device):
    idx, weights = _routing(T, k, E, device)
    leaves = _leaves(T, D, F, E, dtype, device)
    dout = torch.randn(T, D, device=device).to(dtype)
    out, grads = _grads(triton_ops, leaves, idx, weights, E, drop, dout)
    ref_leaves = [t.float() for t in leaves]
    ref_out, ref_grads = _grads(reference, ref_leaves, idx, weights, E, drop, dout.float())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref_out, **TOL[dtype])
    for name, g, ref in zip(["x", "w1", "w2", "weights"], grads, ref_grads):
        assert g is not None and g.dtype == (weights.dtype if name == "weights" else dtype), name
        torch.testing.assert_close(g.float(), ref, **TOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_route_matches_reference(device):
    idx, _ = _routing(150, 2, 8, device)
    order, counts = triton_ops.route(idx, 8)
    ref_order, ref_counts = reference.route(idx, 8)
    assert torch.equal(order, ref_order) and torch.equal(counts, ref_counts)


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ops_pass_opcheck(device):
    T, k, E, D = 12, 2, 4, 8
    idx, weights = _routing(T, k, E, device)
    order, counts = reference.route(idx, E)
    offs = counts.cumsum(0).to(torch.int32)
    x = torch.randn(T, D, device=device, requires_grad=True)
    y = torch.randn(T * k, D, device=device, requires_grad=True)
    w = torch.randn(E, D, 5, device=device, requires_grad=True)
    wts = weights.clone().requires_grad_()
    ops = torch.ops.moe_lm_triton
    opcheck(ops.route, (idx, E))
    opcheck(ops.gather, (x, order, k))
    opcheck(ops.scatter, (y, order, wts))
    opcheck(ops.grouped_mm, (y, w, offs))


def test_ops_run_on_meta_device_with_backward():
    T, k, E, D, F = 10, 2, 4, 8, 12
    meta = dict(device="meta")
    x = torch.empty(T, D, **meta, requires_grad=True)
    w1 = torch.empty(E, D, F, **meta, requires_grad=True)
    wts = torch.empty(T, k, **meta, requires_grad=True)
    order, counts = triton_ops.route(torch.empty(T, k, dtype=torch.long, **meta), E)
    assert order.shape == (T * k,) and counts.shape == (E,) and order.device.type == "meta"
    h = triton_ops.grouped_mm(triton_ops.gather(x, order, k), w1, counts.to(torch.int32))
    out = triton_ops.scatter(h @ torch.empty(F, D, **meta), order, wts)
    assert out.shape == (T, D)
    out.sum().backward()
    assert x.grad.shape == x.shape and w1.grad.shape == w1.shape and wts.grad.shape == wts.shape


@pytest.mark.parametrize("device", DEVICES)
def test_expert_block_compiles_fullgraph_and_matches_eager(device):
    T, k, E, D, F = 24, 2, 4, 16, 20
    idx, weights = _routing(T, k, E, device)
    leaves = _leaves(T, D, F, E, torch.float32, device)
    dout = torch.randn(T, D, device=device)
    eager_out, eager_grads = _grads(triton_ops, leaves, idx, weights, E, False, dout)

    backend = "inductor" if device == "cuda" else "aot_eager"  # no C++ compile on CPU CI
    compiled = torch.compile(_experts, backend=backend, fullgraph=True)
    ls = [t.detach().clone().requires_grad_() for t in (*leaves, weights)]
    out = compiled(triton_ops, ls[0], idx, ls[3], ls[1], ls[2], E, False)
    out.backward(dout)
    torch.testing.assert_close(out, eager_out)
    for t, g in zip(ls, eager_grads):
        torch.testing.assert_close(t.grad, g)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only error path")
def test_cpu_without_interpreter_raises_config_error():
    code = ("import torch\nfrom moe_lm.errors import ConfigError\nfrom moe_lm.ops import triton_ops\n"
            "try:\n    triton_ops.gather(torch.randn(4, 3), torch.arange(4), 1)\n"
            "except ConfigError as err:\n    print('CONFIG_ERROR', err)\n")
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "CONFIG_ERROR" in res.stdout, res.stderr[-2000:]
    assert "TRITON_INTERPRET=1" in res.stdout and "expert.backend=torch" in res.stdout


def _megablocks_ready() -> bool:
    try:
        get_backend("megablocks")
    except ConfigError:
        return False
    return True


def test_megablocks_backend_explains_how_to_install_when_unavailable():
    if _megablocks_ready():
        pytest.skip("megablocks and CUDA are present")
    with pytest.raises(ConfigError, match=r"pip install 'moe-lm\[megablocks\]'"):
        get_backend("megablocks")


@pytest.mark.gpu
@pytest.mark.skipif(not _megablocks_ready(), reason="needs megablocks and CUDA")
def test_megablocks_backend_matches_reference():
    mb = get_backend("megablocks")
    T, k, E, D, F = 256, 2, 8, 128, 256
    idx, weights = _routing(T, k, E, "cuda")
    leaves = _leaves(T, D, F, E, torch.bfloat16, "cuda")
    dout = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    out, grads = _grads(mb, leaves, idx, weights, E, False, dout)
    ref_out, ref_grads = _grads(reference, [t.float() for t in leaves], idx, weights, E, False,
                                dout.float())
    torch.testing.assert_close(out.float(), ref_out, **TOL[torch.bfloat16])
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), ref, **TOL[torch.bfloat16])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("capacity_factor", [0.0, 1.0], ids=["dropless", "capacity1"])
def test_moe_layer_with_triton_backend_equals_torch_backend(capacity_factor, device):
    from moe_lm.config import ExpertConfig, LossConfig
    from moe_lm.model.moe import MoE

    layers = {}
    for backend in ("torch", "triton"):
        cfg = ExpertConfig(num_experts=8, top_k=2, hidden_size=24, backend=backend,
                           capacity_factor=capacity_factor)
        torch.manual_seed(0)
        layers[backend] = MoE(16, cfg, LossConfig()).to(device)
        for p in layers[backend].parameters():
            torch.nn.init.normal_(p, 0, 0.3)
    x = torch.randn(2, 20, 16, device=device)
    results = {}
    for backend, layer in layers.items():
        xb = x.clone().requires_grad_()
        out, stats = layer(xb)
        (out.square().sum() + stats.terms["aux_loss"].value).backward()
        results[backend] = (out, xb.grad, {n: p.grad for n, p in layer.named_parameters()})
    out, dx, grads = results["triton"]
    ref_out, ref_dx, ref_grads = results["torch"]
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    torch.testing.assert_close(dx, ref_dx, **TOL[torch.float32])
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, **TOL[torch.float32], msg=name)
