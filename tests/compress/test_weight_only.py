"""Weight-only int8 / int4 through torchao: logits close to full precision within a stated
bound, weights held as torchao tensor subclasses, fewer bytes."""

from __future__ import annotations

import copy

import pytest
import torch

from moe_lm.compress.quantize import model_bytes
from moe_lm.compress.weight_only import LinearExperts, quantize_model
from moe_lm.errors import ConfigError
from moe_lm.inference import load_model
from moe_lm.model.moe import Experts, MoE
from moe_lm.ops import get_backend

pytest.importorskip("torchao")

# max |logit change| / max |logit| over 48 positions of the 10-step tiny run: int8 per output
# channel rounds each weight by at most 1/254 of its channel's largest (bound 2%); int4 in groups
# of 32 by up to 1/30 of its group's range, through every layer (measured 0.27; bound 0.5)
BOUNDS = {"int8": 0.02, "int4": 0.5, "int8-experts": 0.02}


@pytest.mark.parametrize("mode", ["int8", "int4", "int8-experts"])
def test_quantized_logits_are_close_to_full_precision(tiny_run, mode):
    model = load_model(tiny_run, device="cpu").model
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens).logits
        quantized = quantize_model(copy.deepcopy(model), mode)
        out = quantized(tokens).logits
    rel = float((out - ref).abs().max() / ref.abs().max())
    assert 0 < rel <= BOUNDS[mode], rel
    assert model_bytes(quantized)["experts"] < model_bytes(model)["experts"] / 3


def test_torchao_int8_holds_every_linear_and_expert_as_a_quantized_subclass(tiny_run):
    model = quantize_model(load_model(tiny_run, device="cpu").model, "int8")
    moe = [m for m in model.modules() if isinstance(m, MoE)]
    assert moe and all(isinstance(m.experts, LinearExperts) for m in moe)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            quantized = type(m.weight).__name__ == "Int8Tensor"
            assert quantized == (".router." not in f".{name}."), name


def test_linear_experts_compute_what_experts_compute():
    torch.manual_seed(0)
    experts = Experts(4, 16, 8)
    for w in experts.parameters():
        torch.nn.init.normal_(w)
    x = torch.randn(10, 16)
    offs = torch.tensor([3, 3, 7, 10], dtype=torch.int32)
    with torch.no_grad():
        assert torch.allclose(LinearExperts(experts)(x, offs), experts(x, offs, get_backend("torch")),
                              atol=1e-5)


def test_unknown_quantize_mode_is_a_clear_error():
    with pytest.raises(ConfigError, match="choose one of"):
        quantize_model(torch.nn.Linear(2, 2), "fp3")
