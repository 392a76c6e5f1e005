"""The backend seam: every registered backend implements `ExpertBackend` and computes, through
the calls the MoE layer makes (route_for_layer, gather, grouped_mm_pair, grouped_mm, scatter),
what moe_lm.ops.reference computes; the registry and config name the same backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_lm import kernels
from moe_lm.config import ExpertConfig, LossConfig, TrainConfig, validate
from moe_lm.errors import ConfigError
from moe_lm.model.moe import MoE
from moe_lm.model.routers import ROUTERS
from moe_lm.ops import BACKENDS, ExpertBackend, get_backend, reference
from moe_lm.ops.reference import ReferenceBackend

RUNNABLE = [pytest.param("torch"),
            pytest.param("triton", marks=pytest.mark.skipif(
                not (kernels.INTERPRET or torch.cuda.is_available()),
                reason="needs TRITON_INTERPRET=1 or CUDA"))]


def layer_calls(backend: ExpertBackend, x, idx, w_Tk, w1, w3, w2, may_pad: bool):
    """The MoE layer's sequence of backend calls for dropless token choice."""
    order, rows_E, tokens_E = backend.route_for_layer(idx, w1.shape[0], may_pad)
    offs = rows_E.cumsum(0).to(torch.int32)
    x_MD = backend.gather(x, order, idx.shape[1])
    a, b = backend.grouped_mm_pair(x_MD, w1, w3, offs)
    y_MD = backend.grouped_mm(F.silu(a) * b, w2, offs)
    return backend.scatter(y_MD, order, w_Tk), tokens_E


@pytest.mark.parametrize("may_pad", [False, True], ids=["unpadded", "padding_allowed"])
@pytest.mark.parametrize("name", RUNNABLE)
def test_backend_matches_the_reference_through_the_layers_calls(name, may_pad):
    backend = get_backend(name)
    assert isinstance(backend, ExpertBackend) and backend.name == name
    gen = torch.Generator().manual_seed(3)
    T, k, E, D, Fh = 600, 2, 4, 16, 24  # 1200 assignments, 4 experts: the torch backend pads
    idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    leaves = [torch.randn(T, D, generator=gen), torch.rand(T, k, generator=gen),
              torch.randn(E, D, Fh, generator=gen) / 4, torch.randn(E, D, Fh, generator=gen) / 4,
              torch.randn(E, Fh, D, generator=gen) / 5]
    g = torch.randn(T, D, generator=gen)
    results = []
    for b in (backend, ReferenceBackend()):
        ls = [t.clone().requires_grad_() for t in leaves]
        out, tokens_E = layer_calls(b, ls[0], idx, ls[1], *ls[2:], may_pad=may_pad)
        results.append((out, tokens_E, torch.autograd.grad(out, ls, g)))
    (out, tokens, grads), (ref, ref_tokens, ref_grads) = results
    assert torch.equal(tokens, ref_tokens) and int(tokens.sum()) == T * k  # real, not padded
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("T", [1, 3, 40])
def test_torch_backend_without_autograd_matches_the_reference_at_decoding_sizes(T):
    """Generation's path (no autograd on CPU: the per-expert loop), empty groups included."""
    gen = torch.Generator().manual_seed(T)
    k, E, D, Fh = 2, 8, 16, 24
    idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    x, w_Tk = torch.randn(T, D, generator=gen), torch.rand(T, k, generator=gen)
    w1, w3 = (torch.randn(E, D, Fh, generator=gen) / 4 for _ in range(2))
    w2 = torch.randn(E, Fh, D, generator=gen) / 5
    with torch.no_grad():
        out, _ = layer_calls(get_backend("torch"), x, idx, w_Tk, w1, w3, w2, may_pad=True)
    ref, _ = layer_calls(ReferenceBackend(), x, idx, w_Tk, w1, w3, w2, may_pad=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_torch_backend_pads_only_where_the_caller_allows():
    backend = get_backend("torch")
    idx = torch.randint(0, 4, (600, 2))
    _, rows_padded, tokens = backend.route_for_layer(idx, 4, may_pad=True)
    _, rows, _ = backend.route_for_layer(idx, 4, may_pad=False)
    assert (rows_padded % 16 == 0).all() and (rows_padded >= tokens).all()
    assert torch.equal(rows, tokens) and torch.equal(tokens, torch.bincount(idx.flatten()))


def test_reference_route_is_the_stable_sort():
    idx = torch.randint(0, 5, (40, 3))
    order, counts = reference.route(idx, 5)
    assert torch.equal(order, torch.sort(idx.flatten(), stable=True).indices)
    assert torch.equal(counts, torch.bincount(idx.flatten(), minlength=5))


def test_moe_layer_on_the_torch_backend_equals_the_layer_on_the_reference():
    torch.manual_seed(0)
    moe = MoE(8, ExpertConfig(num_experts=4, top_k=2, hidden_size=12), LossConfig()).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.5)
    x = torch.randn(2, 300, 8, dtype=torch.float64)
    out, stats = moe(x)
    moe.backend = ReferenceBackend()
    ref, ref_stats = moe(x)
    torch.testing.assert_close(out, ref)
    assert torch.equal(stats.tokens_per_expert, ref_stats.tokens_per_expert)


def test_registry_and_config_name_the_same_backends_and_routers():
    assert list(BACKENDS) == ["torch", "triton", "megablocks"]
    with pytest.raises(ConfigError, match="choose torch, triton or megablocks"):
        get_backend("cuda")
    for name in BACKENDS:
        validate(TrainConfig(expert=ExpertConfig(backend=name)))
    for name in ROUTERS:
        extra = {"expert_choice": dict(capacity_factor=1.0),
                 "group_limited": dict(num_groups=4, topk_groups=2)}.get(name, {})
        validate(TrainConfig(expert=ExpertConfig(router=name, **extra)))
    with pytest.raises(ConfigError, match="expert.router='topk'"):
        validate(TrainConfig(expert=ExpertConfig(router="topk")))
