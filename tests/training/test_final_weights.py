"""trainer.final_weights_only: a finished run keeps one weights-only checkpoint the tools load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from moe_lm.errors import CheckpointError
from moe_lm.inference import load_model
from moe_lm.training.checkpoint import list_checkpoints
from moe_lm.training.final_weights import keep_final_weights_only
from tests.training.helpers import train_in_process


def ckpt_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_weights_only_checkpoint_gives_the_same_logits_and_is_a_third_the_size(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    full = list_checkpoints(run)[0]
    before = load_model(run, device="cpu")
    tokens = torch.randint(0, before.cfg.model.vocab_size, (2, 16),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = before.model(tokens).logits
    full_bytes = ckpt_bytes(full.path)
    keep_final_weights_only(run, before.model)
    (slim,) = list_checkpoints(run)  # the older checkpoints are gone
    assert slim.path == full.path and slim.meta["weights_only"] and slim.step == full.step
    param_bytes = sum(p.numel() * p.element_size() for p in before.model.parameters())
    assert ckpt_bytes(slim.path) < 1.2 * param_bytes < 0.5 * full_bytes  # AdamW held 2 x weights
    with torch.no_grad():
        assert torch.equal(load_model(run, device="cpu").model(tokens).logits, expected)


def test_run_with_final_weights_only_ends_with_one_slim_checkpoint_and_refuses_resume(
        tmp_path, tiny_overrides):
    run = tmp_path / "run"
    overrides = [*tiny_overrides, "trainer.max_steps=4", "trainer.ckpt_every=2",
                 "trainer.eval_every=2", "trainer.final_weights_only=true"]
    train_in_process(run, overrides)
    (ckpt,) = list_checkpoints(run)
    assert ckpt.step == 4 and json.loads((ckpt.path / "meta.json").read_text())["weights_only"]
    with pytest.raises(CheckpointError, match="final weights only"):
        train_in_process(run, [*overrides, "trainer.max_steps=6"])
