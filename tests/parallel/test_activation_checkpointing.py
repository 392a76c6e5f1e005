"""Activation checkpointing changes memory, never the numbers; parameter names stay the same."""

from __future__ import annotations

import pytest
import torch

from moe_lm.config import ParallelConfig
from moe_lm.errors import ConfigError
from moe_lm.model import Transformer
from moe_lm.parallel import apply_activation_checkpointing, init_on_device
from tests.distributed.workers import tiny_config


def _loss_and_grads(mode: str):
    cfg = tiny_config(ParallelConfig())
    model = init_on_device(Transformer(cfg.model, cfg.expert, cfg.loss), "cpu", seed=7)
    apply_activation_checkpointing(model, mode)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    out = model(tokens[:, :-1], tokens[:, 1:], return_logits=False)
    loss = out.lm_loss + sum(s.terms["aux_loss"].value for s in out.moe_stats)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointed_blocks_give_the_same_loss_and_gradients(mode):
    loss0, grads0 = _loss_and_grads("none")
    loss1, grads1 = _loss_and_grads(mode)
    assert loss1 == loss0
    assert grads1.keys() == grads0.keys()  # no wrapper prefixes in the names
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-6, atol=1e-7, msg=name)


def test_unknown_mode_is_a_config_error():
    cfg = tiny_config(ParallelConfig())
    with pytest.raises(ConfigError, match="none, full or selective"):
        apply_activation_checkpointing(Transformer(cfg.model, cfg.expert, cfg.loss), "some")
