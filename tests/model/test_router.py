"""Router and router losses against known answers."""

import math

import torch

from moe_lm.config import ExpertConfig, LossConfig
from moe_lm.model.router_losses import load_balance_loss, router_entropy, z_loss
from moe_lm.model.routers import build_router


def test_balance_loss_is_one_for_uniform_routing():
    E, T, k = 8, 64, 2
    probs_TE = torch.full((T, E), 1.0 / E)
    idx_Tk = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], dim=1)
    assert math.isclose(float(load_balance_loss(probs_TE, idx_Tk)), 1.0, rel_tol=1e-6)


def test_balance_loss_is_num_experts_when_all_tokens_pick_one_expert():
    E, T = 8, 32
    probs_TE = torch.zeros(T, E)
    probs_TE[:, 3] = 1.0
    idx_Tk = torch.full((T, 1), 3)
    assert math.isclose(float(load_balance_loss(probs_TE, idx_Tk)), float(E), rel_tol=1e-6)


def test_sequence_level_balance_loss_sees_per_sequence_imbalance():
    E, S = 4, 8
    # sequence 0 all on expert 0, sequence 1 all on expert 1: balanced overall, not per sequence
    idx_Tk = torch.cat([torch.zeros(S, 1), torch.ones(S, 1)]).long()
    probs_TE = torch.nn.functional.one_hot(idx_Tk[:, 0], E).float()
    assert math.isclose(float(load_balance_loss(probs_TE, idx_Tk)), 2.0, rel_tol=1e-6)
    assert math.isclose(float(load_balance_loss(probs_TE, idx_Tk, seq_len=S)), 4.0, rel_tol=1e-6)


def test_z_loss_equals_squared_logsumexp():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2) ** 2 + math.log(math.e + math.e**2) ** 2) / 2
    assert math.isclose(float(z_loss(logits)), expected, rel_tol=1e-6)


def test_router_entropy_of_uniform_is_log_num_experts():
    assert math.isclose(float(router_entropy(torch.full((5, 8), 1 / 8))), math.log(8), rel_tol=1e-6)


def test_softmax_router_picks_top2_and_renormalises():
    router = build_router(4, ExpertConfig(num_experts=4, top_k=2), LossConfig())
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
    x = torch.tensor([[3.0, 2.0, 0.0, -1.0]])
    r = router(x)
    assert r.expert_idx_Tk.tolist() == [[0, 1]]
    p = torch.softmax(x, -1)[0]
    expected = torch.tensor([p[0], p[1]]) / (p[0] + p[1])
    torch.testing.assert_close(r.weights_Tk[0], expected)
    torch.testing.assert_close(r.weights_Tk.sum(-1), torch.ones(1))
