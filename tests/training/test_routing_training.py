"""Every routing preset trains the tiny model on CPU and lowers the loss; the routing metrics,
bias values, heatmaps and alerts reach metrics.jsonl and the console. (What reaches wandb:
test_routing_wandb_dashboard.py.)"""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics
from tests.training.helpers import train_in_process

STEPS = [
    "trainer.max_steps=8", "trainer.log_every=2", "trainer.eval_every=8", "trainer.ckpt_every=8",
    "trainer.monitor.window=4", "optim.lr=3e-3",
]


@pytest.mark.parametrize("preset, extra", [
    ("top2", []),
    ("top2_capacity", ["expert.jitter=0.01"]),
    ("sigmoid", ["loss=sequence"]),
    ("expert_choice", ["expert.num_shared=1"]),
    ("aux_free", ["loss=aux_free"]),
])
def test_each_preset_trains_lowers_the_loss_and_logs_its_routing(tmp_path, tiny_overrides,
                                                                  capsys, preset, extra):
    run = tmp_path / preset
    train_in_process(run, [*tiny_overrides, *STEPS, f"expert={preset}", *extra])
    out = capsys.readouterr().out
    rows = read_metrics(run)
    evals = [r for r in rows if "val_loss" in r]
    assert [e["step"] for e in evals] == [0, 8]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    train = [r for r in rows if "loss" in r]
    last = train[-1]
    for key in ("loss", "lm_loss", "aux_loss", "z_loss", "moe/load_imbalance", "moe/dropped_frac",
                "moe/router_entropy", "moe/layer0/tokens_per_expert", "moe/layer0/load_cv"):
        assert key in last, key
    loads = [r["moe/layer0/tokens_per_expert"] for r in train]
    if preset == "expert_choice":  # every expert takes C = T * k / E tokens, no balance loss
        assert all(t == [4 * 32 * 2 // 4 * 2] * 4 for t in loads)  # 2 steps per logged row
        assert all(r["aux_loss"] == 0.0 for r in train)
    if preset == "top2_capacity":
        assert any(r["moe/dropped_frac"] > 0 for r in train)
    if preset in ("top2", "sigmoid", "aux_free"):
        assert all(r["moe/dropped_frac"] == 0 for r in train)
    if preset == "aux_free":
        bias = [r["moe/layer0/score_bias"] for r in train]
        assert any(b != [0.0] * 4 for b in bias) and last["moe/score_bias_absmax"] > 0
        assert last["moe/score_bias_absmax"] <= 8 * 0.01 + 1e-9  # at most the rate per step
    else:
        assert "moe/layer0/score_bias" not in last
    assert (run / "plots" / "expert_load_step_0000008.png").is_file()
    assert "WARNING" not in out  # a healthy run raises no routing alert


def test_detector_alert_reaches_the_console_from_a_real_run(tmp_path, tiny_overrides, capsys):
    # dead_frac=0.99 calls any expert under 99% of the layer mean dead: the alert path must fire
    train_in_process(tmp_path / "run", [*tiny_overrides, *STEPS, "trainer.max_steps=4",
                                        "trainer.monitor.dead_frac=0.99",
                                        "trainer.monitor.window=2"])
    out = capsys.readouterr().out
    assert "WARNING: dead expert: layer 0 expert" in out and "loss.aux_coef" in out


def test_aux_free_bias_is_saved_and_restored_with_the_checkpoint(tmp_path):
    import torch

    from moe_lm.config import ExpertConfig, LossConfig, ModelConfig, OptimConfig
    from moe_lm.model import Transformer
    from moe_lm.model.routers import Router
    from moe_lm.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
    from moe_lm.training.optim import build_optimizer

    def model_and_optimizer():
        cfg = ModelConfig(n_layers=3, d_model=32, n_heads=2, n_kv_heads=1, ffn_hidden=32,
                          vocab_size=64)
        model = Transformer(cfg, ExpertConfig(num_experts=4, hidden_size=16, router="sigmoid",
                                              bias_update_rate=0.001), LossConfig())
        model.init_weights()
        return model, build_optimizer(model, OptimConfig())

    model, optimizer = model_and_optimizer()
    routers = [m for m in model.modules() if isinstance(m, Router)]
    for i, router in enumerate(routers):
        router.score_bias.copy_(torch.tensor([0.003, -0.001, 0.0, -0.002]) * (i + 1))
    save_checkpoint(tmp_path, 7, model, optimizer, {"step": 7}, {}, keep_last=1)
    fresh, fresh_optimizer = model_and_optimizer()
    load_checkpoint(list_checkpoints(tmp_path)[0], fresh, fresh_optimizer)
    restored = [m.score_bias for m in fresh.modules() if isinstance(m, Router)]
    assert len(restored) == 2
    for a, b in zip(restored, routers):
        torch.testing.assert_close(a, b.score_bias)
