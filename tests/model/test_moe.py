"""The MoE layer against a naive per-token loop, and capacity dropping."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe_lm.config import ExpertConfig, LossConfig
from moe_lm.model.moe import MoE
from moe_lm.model.routing import drop_over_capacity


def make_moe(**kw) -> MoE:
    cfg = ExpertConfig(**{"num_experts": 4, "top_k": 2, "hidden_size": 12, **kw})
    moe = MoE(8, cfg, LossConfig())
    torch.manual_seed(0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.5)
    return moe


def naive_moe(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """Per token, per chosen expert: weight * SwiGLU_e(x)."""
    r = moe.router(x_TD)
    ex = moe.experts
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for j in range(r.expert_idx_Tk.shape[1]):
            e = int(r.expert_idx_Tk[t, j])
            h = F.silu(x_TD[t] @ ex.w1_EDF[e]) * (x_TD[t] @ ex.w3_EDF[e])
            out[t] += r.weights_Tk[t, j] * (h @ ex.w2_EFD[e])
    if moe.shared is not None:
        out += moe.shared(x_TD)
    return out


@pytest.mark.parametrize("num_shared", [0, 1])
@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_matches_naive_per_token_reference(top_k, num_shared):
    moe = make_moe(top_k=top_k, num_shared=num_shared)
    x = torch.randn(2, 5, 8)
    out, stats = moe(x)
    torch.testing.assert_close(out.reshape(-1, 8), naive_moe(moe, x.reshape(-1, 8)),
                               rtol=1e-5, atol=1e-5)
    assert int(stats.tokens_per_expert.sum()) == 10 * top_k
    assert float(stats.dropped_frac) == 0.0


def test_moe_gradients_match_naive_reference():
    moe = make_moe()
    x = torch.randn(1, 6, 8, requires_grad=True)
    out, _ = moe(x)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), [x, *moe.parameters()])
    ref = naive_moe(moe, x.reshape(-1, 8)).reshape_as(out)
    ref_grads = torch.autograd.grad((ref * g).sum(), [x, *moe.parameters()])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_drop_over_capacity_keeps_first_tokens_of_each_expert():
    # assignments sorted by expert: expert 0 has 3, expert 1 has 0, expert 2 has 2
    order = torch.tensor([5, 1, 4, 0, 3])
    counts = torch.tensor([3, 0, 2])
    kept, kept_counts = drop_over_capacity(order, counts, capacity=2)
    assert kept.tolist() == [5, 1, 0, 3]
    assert kept_counts.tolist() == [2, 0, 2]


def test_capacity_drops_overflow_tokens_which_then_get_zero_output():
    moe = make_moe(num_experts=4, top_k=1, capacity_factor=1.0)
    with torch.no_grad():  # every token prefers expert 2
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[2] = 0.0
        moe.router.gate.weight[2, 0] = 1.0
    x = torch.randn(1, 8, 8)
    x[..., 0] = 5.0
    out, stats = moe(x)
    capacity = math.ceil(1.0 * 8 * 1 / 4)  # 2 tokens per expert
    assert math.isclose(float(stats.dropped_frac), 1 - capacity / 8)
    assert out[0, capacity:].abs().max() == 0  # dropped tokens pass only through the residual
    assert out[0, :capacity].abs().max() > 0
    moe.eval()  # inference never drops
    out_eval, stats_eval = moe(x)
    assert float(stats_eval.dropped_frac) == 0 and out_eval[0, capacity:].abs().max() > 0
