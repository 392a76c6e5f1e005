"""Hugging Face export of a trained tiny run: transformers' own Mixtral gives the same logits."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moe_lm.config import ExpertConfig, LossConfig, ModelConfig, TrainConfig
from moe_lm.inference import load_model
from moe_lm.interop.hf_export import SHARE_NOTE, export, export_problems, export_summary
from moe_lm.model import Transformer
from tests.training.helpers import train_run


def test_exported_mixtral_logits_in_transformers_match_moe_lm(tiny_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = export(tiny_run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    loaded = load_model(tiny_run, device="cpu")
    tokens = torch.randint(0, loaded.cfg.model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = loaded.model(tokens).logits, hf(tokens).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()


@pytest.mark.parametrize("change, words", [
    (dict(num_shared=1), "num_shared"), (dict(router="sigmoid"), "router=sigmoid")])
def test_export_refuses_settings_mixtral_cannot_express(change, words):
    cfg = TrainConfig(model=ModelConfig(n_layers=2, d_model=32, vocab_size=64),
                      expert=ExpertConfig(num_experts=4, hidden_size=16, **change))
    model = Transformer(cfg.model, cfg.expert, cfg.loss)
    problems = export_problems(cfg, model)
    assert len(problems) == 1 and words in problems[0]
    assert export_problems(replace(cfg, expert=ExpertConfig(num_experts=4, hidden_size=16)),
                           Transformer(cfg.model, ExpertConfig(num_experts=4, hidden_size=16),
                                       LossConfig())) == []


@pytest.mark.slow
def test_shared_layers_export_unrolled_with_a_note_and_the_same_logits(tiny_overrides, tmp_path):
    """HF formats have no cross-layer sharing: each applied layer gets its own copy."""
    transformers = pytest.importorskip("transformers")
    run = tmp_path / "shared"
    train_run(run, [*tiny_overrides, "model.n_layers=4", "model.n_dense_layers=0",
                    "model.share_layers=2", "trainer.max_steps=2", "trainer.ckpt_every=2"])
    out = export(run, tmp_path / "hf")
    assert "model.share_layers=2" in (out / SHARE_NOTE).read_text()
    assert "model.share_layers=2" in export_summary(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.num_hidden_layers == 4
    loaded = load_model(run, device="cpu")
    assert len(loaded.model.layers) == 2
    tokens = torch.randint(0, loaded.cfg.model.vocab_size, (2, 24),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = loaded.model(tokens).logits, hf(tokens).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()
