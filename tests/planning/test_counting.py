"""The plan's parameter and FLOP counts against the real model: exact, for several shapes."""

import unittest.mock

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moe_lm.config import TrainConfig
from moe_lm.model import Transformer, count_params
from moe_lm.ops import torch_backend
from moe_lm.planning.counting import build_meta_model, count_by_component, flops_per_token, totals

SMALL_CONFIGS = {
    "tiny_default": {},
    "untied_shared_expert": {"model.tie_embeddings": False, "expert.num_shared": 1},
    "moe_every_other_no_dense": {"model.n_dense_layers": 0, "model.moe_every": 2,
                                 "model.n_layers": 5},
    "top1_16_experts_gqa1": {"expert.num_experts": 16, "expert.top_k": 1, "model.n_kv_heads": 1},
    "all_dense": {"model.n_dense_layers": 4},
    "shared_2_dense_then_moe": {"model.n_dense_layers": 2, "model.share_layers": 2},
    "shared_4_all_moe_untied": {"model.n_dense_layers": 0, "model.share_layers": 4,
                                "model.tie_embeddings": False},
}


def make_cfg(overrides: dict, vocab: int = 1000) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.vocab_size = vocab
    for key, value in overrides.items():
        group, name = key.split(".")
        setattr(getattr(cfg, group), name, value)
    return cfg


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_plan_param_count_equals_the_instantiated_model_exactly(name):
    cfg = make_cfg(SMALL_CONFIGS[name])
    real = Transformer(cfg.model, cfg.expert, cfg.loss)
    table = count_by_component(build_meta_model(cfg), cfg.expert.top_k, cfg.expert.num_experts)
    planned = totals(table)
    assert planned["total"] == sum(p.numel() for p in real.parameters())
    assert planned == count_params(cfg.model, cfg.expert)
    experts = table["experts"]
    assert experts["active"] * cfg.expert.num_experts == experts["total"] * cfg.expert.top_k


@pytest.mark.parametrize("n_dense_layers, share", [(4, 1), (1, 1), (2, 2)])  # all dense; MoE
def test_plan_flops_equal_torch_flop_counter_on_a_real_step(n_dense_layers, share):  # after 0; shared
    # math SDPA (counted as bmm, non-causal) and the per-expert matmul loop: every FLOP visible;
    # a shared block's weights are counted once but multiply activations once per applied layer
    cfg = make_cfg({"model.n_dense_layers": n_dense_layers, "model.tie_embeddings": False,
                    "model.share_layers": share, "data.seq_len": 64, "data.batch_size": 2},
                   vocab=512)
    model = Transformer(cfg.model, cfg.expert, cfg.loss)
    model.init_weights()
    tokens = torch.randint(0, 512, (2, 65))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), \
            unittest.mock.patch.object(torch_backend, "_native_grouped_mm_ok", lambda x, w: False):
        model(tokens[:, :-1], tokens[:, 1:], return_logits=False).lm_loss.backward()
    table = count_by_component(model, cfg.expert.top_k, cfg.expert.num_experts)
    planned = flops_per_token(cfg, table, causal=False)["total"] * tokens[:, :-1].numel()
    assert counter.get_total_flops() == planned


def test_causal_attention_counts_the_mean_number_of_keys():
    cfg = make_cfg({"data.seq_len": 128})
    table = count_by_component(build_meta_model(cfg), 2, 8)
    full = flops_per_token(cfg, table, causal=False)["attention_scores"]
    causal = flops_per_token(cfg, table, causal=True)["attention_scores"]
    assert causal == pytest.approx(full * (128 + 1) / 2 / 128)
