"""Each routing setting against a known answer: balance-loss totals, capacity, expert choice,
sigmoid scores, aux-loss-free bias, jitter, and the config errors of impossible combinations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_lm.config import ExpertConfig, LossConfig, ModelConfig, TrainConfig, validate
from moe_lm.errors import ConfigError
from moe_lm.model import Transformer
from moe_lm.model.moe import MoE
from moe_lm.model.routers import Router, build_router, expert_choice_capacity
from moe_lm.model.terms import total_loss


class FixedGate(nn.Module):
    """A router gate that gives every token the same logits."""

    def __init__(self, logits_E: list[float]):
        super().__init__()
        self.register_buffer("logits_E", torch.tensor(logits_E))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.logits_E.expand(x_TD.shape[0], -1)


def make_moe(**kw) -> MoE:
    cfg = ExpertConfig(**{"num_experts": 4, "top_k": 2, "hidden_size": 12, **kw})
    torch.manual_seed(0)
    moe = MoE(8, cfg, LossConfig())
    for p in moe.parameters():
        nn.init.normal_(p, 0, 0.5)
    return moe


def record_group_sizes(moe: MoE) -> list[list[int]]:
    """Wraps the experts so that each call records how many rows each expert processed."""
    sizes: list[list[int]] = []
    forward = moe.experts.forward

    def recording(x_MD, offs_E, backend):
        sizes.append(torch.diff(offs_E, prepend=offs_E.new_zeros(1)).tolist())
        return forward(x_MD, offs_E, backend)

    moe.experts.forward = recording
    return sizes


def expert_out(moe: MoE, e: int, x_D: torch.Tensor) -> torch.Tensor:
    ex = moe.experts
    return (F.silu(x_D @ ex.w1_EDF[e]) * (x_D @ ex.w3_EDF[e])) @ ex.w2_EFD[e]


@pytest.mark.parametrize("logits, top_k, expected", [
    ([0.0, 0.0, 0.0, 0.0], 2, 1.0),  # uniform router: balance loss 1
    ([50.0, 0.0, 0.0, 0.0], 1, 4.0),  # every token on one expert: balance loss E
])
def test_total_loss_adds_balance_loss_of_one_or_num_experts_times_its_coefficient(
        logits, top_k, expected):
    cfg = TrainConfig(model=ModelConfig(n_layers=3, d_model=32, n_heads=2, n_kv_heads=1,
                                        ffn_hidden=32, n_dense_layers=1, vocab_size=64),
                      expert=ExpertConfig(num_experts=4, top_k=top_k, hidden_size=16),
                      loss=LossConfig(aux_coef=0.25, z_coef=0.0))
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.expert, cfg.loss)
    model.init_weights()
    for module in model.modules():
        if isinstance(module, Router):
            module.gate = FixedGate(logits)
    tokens = torch.randint(0, 64, (2, 9))
    out = model(tokens[:, :-1], tokens[:, 1:], return_logits=False)
    assert math.isclose(float(out.terms["aux_loss"].value), expected, rel_tol=1e-5)
    total = total_loss(out.lm_loss, out.terms)
    assert math.isclose(float(total - out.lm_loss), 0.25 * expected, rel_tol=1e-5)


def test_capacity_factor_one_processes_exactly_capacity_tokens_and_counts_the_rest_dropped():
    moe = make_moe(top_k=1, capacity_factor=1.0)
    moe.router.gate = FixedGate([9.0, 0.0, 0.0, 0.0])  # every token wants expert 0
    sizes = record_group_sizes(moe)
    x = torch.randn(2, 10, 8)
    out, stats = moe(x)
    C = math.ceil(1.0 * 20 * 1 / 4)
    assert sizes[-1] == [C, 0, 0, 0]
    assert stats.tokens_per_expert.tolist() == [20, 0, 0, 0]  # the load before drops
    assert math.isclose(float(stats.dropped_frac), 1 - C / 20)
    out_TD = out.reshape(20, 8)
    assert out_TD[C:].abs().max() == 0 and out_TD[:C].abs().min(-1).values.gt(0).all()


def test_capacity_with_top2_keeps_capacity_assignments_at_each_of_the_two_experts():
    moe = make_moe(top_k=2, capacity_factor=1.0)
    moe.router.gate = FixedGate([3.0, 2.0, 0.0, 0.0])  # every token: experts 0 and 1
    sizes = record_group_sizes(moe)
    _, stats = moe(torch.randn(1, 12, 8))
    C = math.ceil(1.0 * 12 * 2 / 4)
    assert sizes[-1] == [C, C, 0, 0]
    assert math.isclose(float(stats.dropped_frac), 1 - 2 * C / 24)


@pytest.mark.parametrize("capacity_factor", [1.0, 0.25])
def test_expert_choice_gives_every_expert_exactly_capacity_tokens_and_matches_naive_reference(
        capacity_factor):
    moe = make_moe(router="expert_choice", capacity_factor=capacity_factor)
    sizes = record_group_sizes(moe)
    x = torch.randn(2, 10, 8, requires_grad=True)
    out, stats = moe(x)
    T, E = 20, 4
    C = expert_choice_capacity(T, E, 2, capacity_factor)
    assert C == math.ceil(capacity_factor * T * 2 / E)
    assert sizes[-1] == [C] * E and stats.tokens_per_expert.tolist() == [C] * E
    # naive: each expert ranks all tokens by its softmax score and takes the C best
    x_TD = x.reshape(T, 8)
    probs_TE = torch.softmax(x_TD @ moe.router.gate.weight.t(), -1)
    ref_TD = torch.zeros(T, 8)
    taken = torch.zeros(T, dtype=torch.bool)
    for e in range(E):
        ranked = sorted(range(T), key=lambda t: -float(probs_TE[t, e]))
        for t in ranked[:C]:
            ref_TD[t] = ref_TD[t] + probs_TE[t, e] * expert_out(moe, e, x_TD[t])
            taken[t] = True
    torch.testing.assert_close(out.reshape(T, 8), ref_TD, rtol=1e-5, atol=1e-5)
    assert math.isclose(float(stats.dropped_frac), float((~taken).float().mean()), abs_tol=1e-7)
    assert float(stats.terms["aux_loss"].value) == 0.0  # balanced by construction
    g = torch.randn(T, 8)
    params = [x, moe.router.gate.weight, *moe.experts.parameters()]
    grads = torch.autograd.grad((out.reshape(T, 8) * g).sum(), params)
    ref_grads = torch.autograd.grad((ref_TD * g).sum(), params)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_expert_choice_with_small_capacity_leaves_some_tokens_without_an_expert():
    moe = make_moe(router="expert_choice", capacity_factor=0.25)
    out, stats = moe(torch.randn(1, 16, 8))
    untouched = out.reshape(16, 8).abs().amax(-1) == 0
    assert untouched.any() and math.isclose(float(stats.dropped_frac),
                                            float(untouched.float().mean()))


def test_sigmoid_router_weights_are_the_chosen_sigmoid_scores_normalised():
    router = build_router(4, ExpertConfig(num_experts=4, top_k=2, router="sigmoid"), LossConfig())
    router.gate = FixedGate([2.0, -1.0, 0.5, 1.0])
    r = router(torch.zeros(3, 4))
    assert r.expert_idx_Tk[0].tolist() == [0, 3]
    s0, s3 = torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(1.0))
    torch.testing.assert_close(r.weights_Tk[0], torch.stack([s0, s3]) / (s0 + s3))
    sig = torch.sigmoid(torch.tensor([2.0, -1.0, 0.5, 1.0]))
    torch.testing.assert_close(r.probs_TE[0], sig / sig.sum())


def skewed_router(num_experts: int = 8) -> tuple[Router, torch.Tensor]:
    """A sigmoid router whose gate strongly prefers experts 0 and 1 for every token."""
    torch.manual_seed(0)
    router = build_router(16, ExpertConfig(num_experts=num_experts, top_k=2, router="sigmoid"),
                          LossConfig())
    with torch.no_grad():
        router.gate.weight.normal_(0, 0.1)
        router.gate.weight[:2, 0] = 2.0
    x_TD = torch.randn(512, 16)
    x_TD[:, 0] = 1.0  # a constant feature the gate reads as "experts 0 and 1"
    return router, x_TD


def imbalance(router: Router, x_TD: torch.Tensor) -> float:
    load_E = torch.bincount(router(x_TD).expert_idx_Tk.flatten(), minlength=router.num_experts)
    return float(load_E.max() / load_E.float().mean())


def test_aux_free_bias_first_step_lowers_overloaded_and_raises_underloaded_experts():
    router, x_TD = skewed_router()
    load_E = torch.bincount(router(x_TD).expert_idx_Tk.flatten(), minlength=8)
    router.update_score_bias(load_E, 0.01)
    expected = torch.where(load_E.float() > load_E.float().mean(), -0.01, 0.01)
    torch.testing.assert_close(router.score_bias, expected)


def test_aux_free_bias_moves_a_skewed_router_to_balance_within_100_steps():
    router, x_TD = skewed_router()
    start = imbalance(router, x_TD)
    assert start > 3.5  # nearly every token on experts 0 and 1 (E / k = 4 at worst)
    for _ in range(100):
        r = router(x_TD)
        router.update_score_bias(torch.bincount(r.expert_idx_Tk.flatten(), minlength=8), 0.01)
    assert imbalance(router, x_TD) < 1.5
    r = router(x_TD)  # the bias moved the selection; the weights still come from the scores only
    scores_Tk = torch.sigmoid(router.gate(x_TD)).gather(-1, r.expert_idx_Tk)
    torch.testing.assert_close(r.weights_Tk, scores_Tk / scores_Tk.sum(-1, keepdim=True))


def test_router_jitter_perturbs_training_only_and_stays_within_its_band():
    router = build_router(8, ExpertConfig(num_experts=4, top_k=2, jitter=0.1), LossConfig())
    x = torch.randn(32, 8)
    clean_TE = router.gate(x)
    router.train()
    noisy_TE = router(x).logits_TE
    assert not torch.allclose(noisy_TE, clean_TE)
    band = 0.1 * (x.abs() @ router.gate.weight.abs().t())  # |gate(x * noise) - gate(x)| bound
    assert ((noisy_TE - clean_TE).abs() <= band + 1e-6).all()
    router.eval()
    torch.testing.assert_close(router(x).logits_TE, clean_TE)


def test_shared_and_fine_grained_experts_combine_with_expert_choice():
    moe = make_moe(router="expert_choice", capacity_factor=1.0, num_shared=1, hidden_size=4)
    x = torch.randn(1, 6, 8)
    out, _ = moe(x)
    no_shared = out.reshape(6, 8) - moe.shared(x.reshape(6, 8))
    moe.shared = None
    torch.testing.assert_close(moe(x)[0].reshape(6, 8), no_shared, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("expert, words", [
    (dict(router="expert_choice", capacity_factor=0.0), "capacity_factor"),
    (dict(router="expert_choice", capacity_factor=1.0, bias_update_rate=0.001), "expert_choice"),
    (dict(jitter=1.5), "expert.jitter"),
    (dict(bias_update_rate=-0.1), "bias_update_rate"),
])
def test_impossible_routing_settings_raise_config_error_saying_what_to_change(expert, words):
    with pytest.raises(ConfigError, match=words):
        validate(TrainConfig(expert=ExpertConfig(**expert)))
