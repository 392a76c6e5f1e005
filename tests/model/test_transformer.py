"""The transformer: causality, parameter count, init, tied embeddings."""

import dataclasses

import pytest
import torch

from moe_lm.config import ExpertConfig, LossConfig, ModelConfig
from moe_lm.model import Transformer, count_params, is_moe_layer


def tiny(**kw):
    m = ModelConfig(**{"n_layers": 3, "d_model": 32, "n_heads": 4, "n_kv_heads": 2,
                       "ffn_hidden": 48, "vocab_size": 97, **kw})
    e = ExpertConfig(num_experts=4, top_k=2, hidden_size=16)
    net = Transformer(m, e, LossConfig())
    torch.manual_seed(0)
    net.init_weights()
    return net, m, e


def test_future_tokens_never_change_earlier_logits():
    net, _, _ = tiny()
    net.eval()
    x = torch.randint(0, 97, (2, 12))
    y = x.clone()
    y[:, 7:] = torch.randint(0, 97, (2, 5))
    a, b = net(x).logits, net(y).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("n_dense, every", [(0, 1), (1, 1), (1, 2), (3, 1)])
def test_parameter_count_matches_formula(tie, n_dense, every):
    net, m, e = tiny(tie_embeddings=tie, n_dense_layers=n_dense, moe_every=every)
    counted = sum(p.numel() for p in net.parameters())
    assert count_params(m, e)["total"] == counted


def test_parameter_count_of_default_shape_by_hand():
    m = ModelConfig(vocab_size=100277)  # 4 layers, d 256, 1 dense, 8 experts x 512
    e = ExpertConfig()
    attn = 256 * 256 + 2 * 256 * 128 + 256 * 256
    expected = (100277 * 256 + 256 + 4 * (attn + 512) + 3 * 256 * 768
                + 3 * (256 * 8 + 8 * 3 * 256 * 512))
    assert count_params(m, e)["total"] == expected
    assert count_params(m, e)["active"] == expected - 3 * 6 * 3 * 256 * 512


def test_moe_layer_placement():
    m = ModelConfig(n_layers=6, n_dense_layers=2, moe_every=2)
    assert [is_moe_layer(i, m) for i in range(6)] == [False, False, True, False, True, False]


def test_output_projections_get_depth_scaled_init():
    net, m, _ = tiny(n_layers=8)
    wo_std = net.layers[0].attn.wo.weight.std().item()
    wq_std = net.layers[0].attn.wq.weight.std().item()
    assert abs(wq_std / wo_std - 4.0) < 0.6  # sqrt(2 * 8) = 4


def test_loss_is_finite_and_backward_reaches_every_parameter():
    net, _, _ = tiny()
    x = torch.randint(0, 97, (2, 9))
    out = net(x[:, :-1], x[:, 1:])
    loss = out.lm_loss + sum(s.terms["aux_loss"].value + s.terms["z_loss"].value for s in out.moe_stats)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing


def test_fused_head_loss_equals_plain_cross_entropy_in_value_and_gradients():
    net, _, _ = tiny()
    x = torch.randint(0, 97, (2, 9))
    fused = net(x[:, :-1], x[:, 1:], return_logits=False).lm_loss
    g_fused = torch.autograd.grad(fused, list(net.parameters()), allow_unused=True)
    plain = net(x[:, :-1], x[:, 1:], return_logits=True).lm_loss
    g_plain = torch.autograd.grad(plain, list(net.parameters()), allow_unused=True)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_last_only_logits_equal_the_full_forwards_last_position(rows):
    """Generation's head (`few_rows_logits`, weight as the left operand) against F.linear."""
    net, _, _ = tiny()
    net.eval()
    x = torch.randint(0, 97, (rows, 9))
    with torch.no_grad():
        full = net(x).logits[:, -1:]
        last = net(x, last_only=True).logits
    assert last.shape == full.shape == (rows, 1, 97)
    torch.testing.assert_close(last, full, rtol=1e-5, atol=1e-6)
    assert torch.equal(last.argmax(-1), full.argmax(-1))
