"""The fast paths of the speed work compute what the plain formulations compute.

- the fused LM-head cross-entropy, across chunk and softmax-block boundaries, in fp64 and bf16;
- the complex-multiply rotary against the real-arithmetic rotation of consecutive pairs;
- the MoE experts run in the autocast dtype (bf16), not in the fp32 of the residual stream.
"""

import pytest
import torch
import torch.nn.functional as F

from moe_lm.config import ExpertConfig, LossConfig
from moe_lm.model import losses
from moe_lm.model.moe import MoE
from moe_lm.model.transformer import apply_rotary, rotary_tables


@pytest.mark.parametrize("rows_bytes, chunk", [(3 * 4 * 50, 8), (4 * 50, 5), (1 << 20, 64)])
def test_fused_cross_entropy_matches_reference_across_blocks_and_chunks(monkeypatch, rows_bytes,
                                                                        chunk):
    monkeypatch.setattr(losses, "BLOCK_BYTES", rows_bytes)  # 3 rows, 1 row, all rows per block
    torch.manual_seed(0)
    h = torch.randn(29, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (29,))
    y[3::7] = -100
    got = losses.fused_linear_cross_entropy(h, w, y, chunk=chunk)
    ref = F.cross_entropy(h @ w.t(), y, ignore_index=-100)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(torch.autograd.grad(got * 1.7, [h, w]),
                               torch.autograd.grad(ref * 1.7, [h, w]))


def test_fused_cross_entropy_bf16_gradients_match_fp32_reference(monkeypatch):
    monkeypatch.setattr(losses, "BLOCK_BYTES", 4 * 4 * 3000)  # 4 rows per block
    torch.manual_seed(1)
    h = torch.randn(37, 32, requires_grad=True)
    w = (torch.randn(3000, 32) * 0.3).requires_grad_()
    y = torch.randint(0, 3000, (37,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = losses.fused_linear_cross_entropy(h, w, y, chunk=16)
    hb, wb = h.detach().bfloat16().double(), w.detach().bfloat16().double()
    hb.requires_grad_(), wb.requires_grad_()
    ref = F.cross_entropy(hb @ wb.t(), y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-3)
    gh, gw = torch.autograd.grad(got, [h, w])
    rh, rw = torch.autograd.grad(ref, [hb, wb])
    for g, r in ((gh, rh), (gw, rw)):
        assert (g.double() - r).abs().max() <= 2e-2 * r.abs().max()


def _rotary_real_pairs(x_BSHD, rope_SF2):
    x = x_BSHD.float().reshape(*x_BSHD.shape[:-1], -1, 2)
    cos, sin = rope_SF2[None, :, None, :, 0], rope_SF2[None, :, None, :, 1]
    out = torch.stack([x[..., 0] * cos - x[..., 1] * sin, x[..., 0] * sin + x[..., 1] * cos], -1)
    return out.flatten(-2).to(x_BSHD.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_complex_rotary_matches_real_pair_rotation_and_its_gradient(dtype):
    rope = rotary_tables(12, 8, 10000.0)[3:]  # a sliced table, as with a KV cache
    x = torch.randn(2, 9, 3, 8, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 9, 3, 8, dtype=dtype)
    got, ref = apply_rotary(x, rope), _rotary_real_pairs(x, rope)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_moe_experts_run_in_the_autocast_dtype(monkeypatch):
    moe = MoE(32, ExpertConfig(num_experts=4, top_k=2, hidden_size=16), LossConfig())
    seen = []
    real = moe.backend.grouped_mm
    monkeypatch.setattr(moe.backend, "grouped_mm",
                        lambda x, w, offs: seen.append(x.dtype) or real(x, w, offs))
    x = torch.randn(2, 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moe(x)
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    moe(x)  # no autocast: the input's dtype
    assert set(seen) == {torch.float32}
