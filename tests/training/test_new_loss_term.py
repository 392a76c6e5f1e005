"""A new loss term is a new name in its producer: the step adds it, metrics and console log it and
the dashboard plots it, with no edit anywhere else (ARCHITECTURE.md, loss terms)."""

from __future__ import annotations

from hydra import compose, initialize_config_module

from moe_lm.config import register_configs, to_train_config
from moe_lm.model import routers
from moe_lm.model.router_losses import router_entropy
from moe_lm.model.terms import LossTerm
from moe_lm.reporting.dashboard import panel_metrics
from tests.conftest import read_metrics
from tests.training.helpers import train_in_process

register_configs()
COEF = 0.5


class EntropyBonusRouter(routers.SoftmaxTopK):
    """The softmax router plus one more named term: minus the router entropy."""

    def loss_terms(self, routing, dispatcher, seq_len):
        terms = super().loss_terms(routing, dispatcher, seq_len)
        return {**terms, "entropy_bonus": LossTerm(-router_entropy(routing.probs_TE), COEF)}


def test_a_router_term_is_added_logged_and_plotted_without_other_edits(tmp_path, tiny_overrides,
                                                                       monkeypatch):
    monkeypatch.setitem(routers.ROUTERS, "softmax", EntropyBonusRouter)
    overrides = [*tiny_overrides, "trainer.max_steps=2", "trainer.eval_every=2"]
    train_in_process(tmp_path / "run", overrides)
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert rows and all("entropy_bonus" in r for r in rows)
    for r in rows:  # the logged total holds the new term with its coefficient
        rest = r["lm_loss"] + 0.01 * r["aux_loss"] + 0.001 * r["z_loss"]
        assert abs(r["loss"] - (rest + COEF * r["entropy_bonus"])) < 1e-4
        assert r["entropy_bonus"] < 0
    with initialize_config_module(config_module="moe_lm.conf", version_base="1.3"):
        cfg = to_train_config(compose(config_name="config", overrides=overrides))
    plotted = [m for _, ms in panel_metrics(cfg)["Loss"] for m in ms]
    assert "entropy_bonus" in plotted and "aux_loss" in plotted
