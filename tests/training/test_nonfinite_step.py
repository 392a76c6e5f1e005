"""A non-finite step: its update is skipped on device (no sync in the step), the run then stops."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module

from moe_lm.config import register_configs, to_train_config
from moe_lm.model.terms import LossTerm
from moe_lm.training import loop
from moe_lm.training.loop import Trainer, TrainingError
from tests.conftest import read_metrics
from tests.training.helpers import train_in_process

register_configs()


def _poison_step(monkeypatch, at_call: int) -> None:
    """Makes the `at_call`-th training micro-step's total loss NaN (a NaN loss term)."""
    original, calls = loop.forward_backward, [0]

    def forward_backward(model, batch, precision, device_type, extra=None, **kwargs):
        calls[0] += 1
        if calls[0] != at_call:
            return original(model, batch, precision, device_type, extra, **kwargs)

        def poisoned(model, batch, out):
            terms = extra(model, batch, out) if extra is not None else {}
            return {**terms, "poison": LossTerm(out.lm_loss * float("nan"))}

        return original(model, batch, precision, device_type, poisoned, **kwargs)

    monkeypatch.setattr(loop, "forward_backward", forward_backward)


def test_nonfinite_step_leaves_weights_and_optimizer_untouched(tmp_path, tiny_overrides,
                                                              monkeypatch):
    with initialize_config_module(config_module="moe_lm.conf", version_base="1.3"):
        cfg = to_train_config(compose(config_name="config", overrides=tiny_overrides))
    trainer = Trainer(cfg, tmp_path)
    for _ in range(2):
        trainer.train_step()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    steps_before = [s["step"].clone() for s in trainer.optimizer.state.values()]
    _poison_step(monkeypatch, 1)
    trainer.train_step()  # returns without waiting on the device
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert all(torch.equal(s["step"], b)
               for s, b in zip(trainer.optimizer.state.values(), steps_before))
    with pytest.raises(TrainingError, match=r"step 3 \(loss nan.*optimizer step was not taken"):
        trainer.check_finite()


def test_nonfinite_step_stops_the_run_before_logging_or_saving_it(tmp_path, tiny_overrides,
                                                                  monkeypatch):
    _poison_step(monkeypatch, 3)
    with pytest.raises(TrainingError, match="step 3"):
        train_in_process(tmp_path / "run", [*tiny_overrides, "trainer.max_steps=6"])
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2]
    assert not list((tmp_path / "run").glob("checkpoints/*"))
