"""The optimizer state is saved keyed by parameter name; checkpoints of the earlier layout (param
groups by number) still load.

Keyed by name, a rank that holds some of the parameters (a pipeline stage) saves exactly its part
of the one-process checkpoint; the earlier nested layout named each param group's parameters in
one list, which ranks holding different parameters cannot share.
"""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from moe_lm.config import ExpertConfig, LossConfig, ModelConfig, OptimConfig
from moe_lm.model import Transformer
from moe_lm.training.checkpoint import (Checkpoint, list_checkpoints, load_checkpoint,
                                        save_checkpoint)
from moe_lm.training.optim import build_optimizer


def _trained():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, ffn_hidden=32,
                      vocab_size=64)
    model = Transformer(cfg, ExpertConfig(num_experts=4, hidden_size=16), LossConfig())
    model.init_weights()
    optimizer = build_optimizer(model, OptimConfig())
    return model, optimizer


def _step(model, optimizer):
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    model(tokens[:, :-1], tokens[:, 1:], return_logits=False).lm_loss.backward()
    optimizer.step()


def _assert_same_state(a, b):
    names = dict(zip(map(id, a[0].parameters()), (n for n, _ in a[0].named_parameters())))
    assert names
    for (pa, pb) in zip(a[0].parameters(), b[0].parameters()):
        torch.testing.assert_close(pa, pb)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a[1].state[pa][key], b[1].state[pb][key],
                                       msg=f"{names[id(pa)]} {key}")


def test_optimizer_state_is_keyed_by_parameter_name(tmp_path):
    model, optimizer = _trained()
    _step(model, optimizer)
    path = save_checkpoint(tmp_path, 1, model, optimizer, {"step": 1}, {}, keep_last=1)
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    assert "optim.state.layers.0.attn.wq.weight.exp_avg" in keys
    assert "optim.param_groups.layers.0.attn.wq.weight.lr" in keys
    fresh = _trained()
    load_checkpoint(list_checkpoints(tmp_path)[0], *fresh)
    _assert_same_state((model, optimizer), fresh)


def test_checkpoint_of_the_nested_optimizer_layout_still_loads(tmp_path):
    model, optimizer = _trained()
    _step(model, optimizer)
    state = {"model": get_model_state_dict(model),
             "optim": get_optimizer_state_dict(model, optimizer)}  # param groups by number
    dcp.save(state, checkpoint_id=str(tmp_path))
    torch.save({"step": 1}, tmp_path / "trainer_state.pt")
    keys = dcp.FileSystemReader(str(tmp_path)).read_metadata().state_dict_metadata
    assert "optim.param_groups.0.lr" in keys
    fresh = _trained()
    assert load_checkpoint(Checkpoint(tmp_path, 1, {}), *fresh) == {"step": 1}
    _assert_same_state((model, optimizer), fresh)
