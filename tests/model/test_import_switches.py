"""The switches imported architectures need: off by default, counted, and what they claim."""

from __future__ import annotations

import pytest
import torch

from moe_lm.config import ExpertConfig, LossConfig, ModelConfig
from moe_lm.model import Transformer, count_params
from moe_lm.model.routers import SoftmaxTopK


@pytest.mark.parametrize("switches", [
    {}, dict(qk_norm="head", head_dim=24), dict(qk_norm="proj"), dict(clip_qkv=0.5)])
def test_count_params_matches_the_model_with_each_switch(switches):
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, vocab_size=50, **switches)
    expert = ExpertConfig(num_experts=4, hidden_size=32)
    model = Transformer(cfg, expert, LossConfig())
    assert count_params(cfg, expert)["total"] == sum(p.numel() for p in model.parameters())


def test_defaults_build_the_same_parameters_as_before():
    model = Transformer(ModelConfig(vocab_size=50), ExpertConfig(), LossConfig())
    assert not any("q_norm" in n or "k_norm" in n for n, _ in model.named_parameters())


def test_per_head_qk_norm_normalises_each_head_and_proj_the_whole_projection():
    for kind, width in (("head", 16), ("proj", 64)):
        cfg = ModelConfig(n_layers=1, d_model=64, n_heads=4, n_kv_heads=4, vocab_size=50,
                          qk_norm=kind)
        attn = Transformer(cfg, ExpertConfig(num_experts=2, hidden_size=8), LossConfig()).layers[0].attn
        torch.nn.init.normal_(attn.wq.weight)
        q, _, _ = attn._project(torch.randn(1, 3, 64))
        rms = q.reshape(1, 3, -1, width).pow(2).mean(-1).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)


def test_raw_topk_weights_are_the_softmax_scores_without_renormalising():
    x = torch.randn(10, 16)
    norm = SoftmaxTopK(16, ExpertConfig(num_experts=6, top_k=2), LossConfig())
    raw = SoftmaxTopK(16, ExpertConfig(num_experts=6, top_k=2, norm_topk_prob=False), LossConfig())
    raw.load_state_dict(norm.state_dict())
    a, b = norm(x), raw(x)
    assert torch.equal(a.expert_idx_Tk, b.expert_idx_Tk)
    assert torch.allclose(b.weights_Tk, b.probs_TE.gather(-1, b.expert_idx_Tk))
    assert torch.allclose(a.weights_Tk, b.weights_Tk / b.weights_Tk.sum(-1, keepdim=True))
    assert bool((b.weights_Tk.sum(-1) < 1).all())
