"""Expert pruning and int8 expert quantization on a trained tiny run."""

from __future__ import annotations

import torch

from moe_lm.compress.prune import prune_model
from moe_lm.compress.quantize import model_bytes, quantize_experts_int8, quantize_int8_per_channel
from moe_lm.inference import load_model
from moe_lm.inference.evaluate import evaluate_loaded
from moe_lm.model import MoE
from moe_lm.prune import main as prune_main


def test_pruning_to_all_experts_changes_nothing(tiny_run):
    loaded = load_model(tiny_run, device="cpu")
    E = loaded.cfg.expert.num_experts
    usage = [torch.arange(E, dtype=torch.float32).flip(0)] * 2
    pruned, cfg, kept = prune_model(loaded.model, loaded.cfg, usage, keep=E)
    tokens = torch.randint(0, loaded.cfg.model.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(pruned(tokens).logits, loaded.model(tokens).logits)
    assert cfg.expert.num_experts == E and kept[0].tolist() == list(range(E))


def test_pruning_keeps_the_most_used_experts_and_saves_a_loadable_checkpoint(tiny_run, tmp_path,
                                                                             capsys):
    assert prune_main([str(tiny_run), "--keep", "2", "--out", str(tmp_path / "pruned")]) == 0
    report = capsys.readouterr().out
    assert "perplexity" in report
    small = load_model(tmp_path / "pruned", device="cpu")
    assert small.cfg.expert.num_experts == 2
    moe = next(m for m in small.model.modules() if isinstance(m, MoE))
    assert moe.experts.w1_EDF.shape[0] == 2 and moe.router.gate.weight.shape[0] == 2
    full = load_model(tiny_run, device="cpu")
    assert torch.isfinite(torch.tensor(evaluate_loaded(small).loss))
    # the kept experts are the full model's, unchanged
    full_moe = next(m for m in full.model.modules() if isinstance(m, MoE))
    rows = [i for i in range(full_moe.experts.w1_EDF.shape[0])
            if any(torch.equal(full_moe.experts.w1_EDF[i], moe.experts.w1_EDF[j]) for j in range(2))]
    assert len(rows) == 2


def test_int8_per_channel_rounding_error_is_at_most_half_a_step():
    w_EKN = torch.randn(3, 40, 24)
    q, scale = quantize_int8_per_channel(w_EKN)
    assert q.dtype == torch.int8 and scale.shape == (3, 1, 24)
    assert ((q.float() * scale - w_EKN).abs() <= scale / 2 + 1e-7).all()


def test_int8_expert_logits_stay_close_to_full_precision_and_save_memory(tiny_run):
    loaded = load_model(tiny_run, device="cpu")
    tokens = torch.randint(0, loaded.cfg.model.vocab_size, (2, 32))
    before_bytes = model_bytes(loaded.model)
    with torch.no_grad():
        full = loaded.model(tokens).logits
        quantize_experts_int8(loaded.model)
        q = loaded.model(tokens).logits
    after_bytes = model_bytes(loaded.model)
    rel = (q - full).norm() / full.norm()
    assert 0 < rel < 0.02, rel
    assert (q.argmax(-1) == full.argmax(-1)).float().mean() > 0.95
    assert after_bytes["experts"] < 0.3 * before_bytes["experts"]
    assert after_bytes["total"] == before_bytes["total"] - (before_bytes["experts"]
                                                           - after_bytes["experts"])
