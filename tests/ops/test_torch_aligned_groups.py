"""The torch backend's CPU speed paths: expert groups padded to aligned row counts, and the w1/w3
grouped-GEMM pair with one in-place backward; each against the plain path, in float64."""

from __future__ import annotations

import pytest
import torch

from moe_lm.config import ExpertConfig, LossConfig
from moe_lm.model.moe import MoE
from moe_lm.ops import reference, torch_backend


def _routing(T, k, E, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]), gen


@pytest.mark.parametrize("T,k,E,align", [(37, 2, 4, 16), (50, 3, 8, 4), (5, 1, 3, 8)])
def test_route_aligned_pads_each_group_after_its_rows(T, k, E, align):
    idx_Tk, _ = _routing(T, k, E, seed=T)
    order_P, rows_E, counts_E = torch_backend.route_aligned(idx_Tk, E, align)
    order_A, counts_ref = torch_backend.route(idx_Tk, E)
    assert torch.equal(counts_E, counts_ref)
    assert bool((rows_E % align == 0).all()) and bool((rows_E >= counts_E).all())
    assert sorted(order_P.tolist()) == list(range(int(rows_E.sum())))  # a permutation
    start = 0
    for e in range(E):  # each group: its real assignments in order, then its padding
        group = order_P[start:start + int(rows_E[e])]
        real = group[:int(counts_E[e])]
        assert torch.equal(real, order_A[int(counts_ref[:e].sum()):int(counts_ref[:e + 1].sum())])
        assert bool((group[int(counts_E[e]):] >= T * k).all())
        start += int(rows_E[e])


@pytest.mark.parametrize("embedding_bag", [True, False], ids=["embedding_bag", "bmm"])
@pytest.mark.parametrize("T,k,E,align", [(37, 2, 4, 16), (50, 3, 8, 4), (5, 1, 3, 8)])
def test_padded_gather_and_scatter_match_unpadded_with_gradients(T, k, E, align, embedding_bag):
    from moe_lm.ops.torch_dropless import CombinePermuted

    idx_Tk, gen = _routing(T, k, E, seed=T + 1)
    D = 6
    x = torch.randn(T, D, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, generator=gen, requires_grad=True)
    scale = torch.linspace(0.5, 2.0, D, dtype=torch.float64)

    def run(order, rows_E):
        x_PD = torch_backend.gather(x, order, k)
        groups = torch.repeat_interleave(torch.arange(E), rows_E)  # a per-expert function
        y_PD = (x_PD * scale).sin() * (1.0 + groups.unsqueeze(1))
        out = CombinePermuted.apply(y_PD, order, w, embedding_bag)
        return x_PD, out

    order_P, rows_E, counts_E = torch_backend.route_aligned(idx_Tk, E, align)
    x_PD, out = run(order_P, rows_E)
    order_A, _ = torch_backend.route(idx_Tk, E)
    x_AD, out_ref = run(order_A, counts_E)
    pad_rows = order_P >= T * k
    assert bool((x_PD[pad_rows] == 0).all())
    torch.testing.assert_close(x_PD[~pad_rows], x_AD)
    torch.testing.assert_close(out, out_ref)
    g = torch.randn(T, D, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(torch.autograd.grad(out, [x, w], g),
                               torch.autograd.grad(out_ref, [x, w], g))


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 4, 0], [6, 1, 0, 0]],
                         ids=["middle_empty", "one_group", "tail_empty"])
def test_grouped_mm_pair_matches_two_grouped_mms(counts):
    gen = torch.Generator().manual_seed(sum(counts))
    T, K, N, E = sum(counts) + 2, 5, 7, len(counts)  # two rows past the last group
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(T, K, dtype=torch.float64, generator=gen, requires_grad=True)
    w_a = torch.randn(E, K, N, dtype=torch.float64, generator=gen, requires_grad=True)
    w_b = torch.randn(E, K, N, dtype=torch.float64, generator=gen, requires_grad=True)
    a, b = torch_backend.grouped_mm_pair(x, w_a, w_b, offs)
    a_ref, b_ref = (reference.grouped_mm(x, w, offs) for w in (w_a, w_b))
    torch.testing.assert_close((a, b), (a_ref, b_ref))
    ga, gb = torch.randn_like(a), torch.randn_like(b)
    got = torch.autograd.grad((a * ga).sum() + (b * gb).sum(), [x, w_a, w_b])
    want = torch.autograd.grad((a_ref * ga).sum() + (b_ref * gb).sum(), [x, w_a, w_b])
    torch.testing.assert_close(got, want)


def test_moe_layer_with_aligned_groups_matches_unaligned(monkeypatch):
    torch.manual_seed(0)
    moe = MoE(16, ExpertConfig(num_experts=4, top_k=2, hidden_size=24), LossConfig()).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x = torch.randn(2, 300, 16, dtype=torch.float64)  # 1200 rows, 4 experts: alignment 16
    assert torch_backend.row_alignment(x.view(-1, 16), 2, 4) == 16

    def run():
        xg = x.clone().requires_grad_()
        out, stats = moe(xg)
        grads = torch.autograd.grad(out.square().sum() + stats.terms["aux_loss"].value,
                                    [xg, *moe.parameters()])
        return out, stats.tokens_per_expert, grads

    out, counts, grads = run()
    monkeypatch.setattr(torch_backend, "row_alignment", lambda x, k, E: 1)
    out_ref, counts_ref, grads_ref = run()
    torch.testing.assert_close(out, out_ref)
    assert torch.equal(counts, counts_ref) and int(counts.sum()) == 1200  # real, not padded
    torch.testing.assert_close(grads, grads_ref)


def test_row_alignment_keeps_padding_small_and_is_off_on_small_batches():
    x = torch.empty(4096, 8)
    assert torch_backend.row_alignment(x, 2, 8) == 32  # 8192 rows: at most 3% padding expected
    assert torch_backend.row_alignment(x, 2, 32) == 16
    assert torch_backend.row_alignment(x, 2, 64) == 1  # 128 rows per expert: no padding
    assert torch_backend.row_alignment(torch.empty(256, 8), 2, 8) == 1
    assert torch_backend.row_alignment(torch.empty(4096, 8, device="meta"), 2, 8) == 1


def test_grouped_mm_pair_in_bfloat16_matches_float32_math():
    """bf16 on CPU (weight gradients from each group's transposed copy, an odd row count and an
    empty group) against the same products in float32: within a few bf16 roundings of each
    tensor's scale."""
    gen = torch.Generator().manual_seed(3)
    counts = [70, 0, 33, 25]  # 2 rows past the last group
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(130, 16, generator=gen).bfloat16().requires_grad_()
    w_a, w_b = (torch.randn(4, 16, 32, generator=gen).bfloat16().requires_grad_()
                for _ in range(2))
    a, b = torch_backend.grouped_mm_pair(x, w_a, w_b, offs)
    ga, gb = torch.randn(a.shape, generator=gen), torch.randn(b.shape, generator=gen)
    got = torch.autograd.grad([a, b], [x, w_a, w_b], [ga.bfloat16(), gb.bfloat16()])
    x32, wa32, wb32 = (t.detach().float().requires_grad_() for t in (x, w_a, w_b))
    a32, b32 = (reference.grouped_mm(x32, w, offs) for w in (wa32, wb32))
    want = torch.autograd.grad([a32, b32], [x32, wa32, wb32],
                               [ga.bfloat16().float(), gb.bfloat16().float()])
    for out, ref in ((a, a32), (b, b32), *zip(got, want)):
        scale = float(ref.detach().abs().max())
        assert float((out.detach().float() - ref.detach()).abs().max()) <= 0.02 * scale
    assert float(got[1][1].abs().max()) == 0.0  # the empty group


def test_grouped_mm_pair_zeroes_the_weight_gradient_of_an_empty_group(monkeypatch):
    """The backward allocates its weight gradients uninitialised: an empty group's block must be
    written (zeros), whatever the memory held (here: NaN)."""
    real_empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like",
                        lambda t, **kw: real_empty_like(t, **kw).fill_(float("nan")))
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    w_a, w_b = (torch.randn(3, 8, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    a, b = torch_backend.grouped_mm_pair(x, w_a, w_b, torch.tensor([2, 2, 6], dtype=torch.int32))
    (a.sum() + b.sum()).backward()
    for w in (w_a, w_b):
        assert torch.isfinite(w.grad).all() and float(w.grad[1].abs().max()) == 0.0
    assert torch.isfinite(x.grad).all()
