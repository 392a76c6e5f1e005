"""`trainer.dry_run=true`: one forward and backward of the real layers on the meta device.

Shapes only: nothing is allocated, so it runs for any size (the 1T experiment included) on any
machine, in seconds, and fails where a shape does not fit (heads, experts, vocabulary, sequence).
The model is the real `Transformer` with the configured activation checkpointing; the MoE layers
route balanced (see `balanced.py`: data-dependent token counts have no values on meta).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from moe_lm.config import TrainConfig
from moe_lm.errors import MoeLMError
from moe_lm.training.objectives import objective_term_names
from moe_lm.parallel import apply_activation_checkpointing
from moe_lm.planning.balanced import use_balanced_routing
from moe_lm.planning.counting import build_meta_model, with_tokenizer_vocab
from moe_lm.planning.memory import planning_config
from moe_lm.training.step import forward_backward


def dry_run(cfg: TrainConfig) -> dict[str, Any]:
    """Runs one micro-step (B = data.batch_size, S = data.seq_len) forward and backward on meta;
    returns what it checked. `cfg.model.vocab_size` must be resolved."""
    start = time.time()
    cfg = planning_config(cfg)
    model = build_meta_model(cfg)
    apply_activation_checkpointing(model, cfg.trainer.activation_checkpointing)
    use_balanced_routing(model)
    model.train()
    B, S = cfg.data.batch_size, cfg.data.seq_len
    tokens_BS1 = torch.zeros((B, S + 1), dtype=torch.int64, device="meta")
    # the training step itself; no autocast on the meta device (shapes only)
    result = forward_backward(model, tokens_BS1, None, "meta", backward=False)
    out, loss = result.out, result.loss
    if loss.shape != torch.Size([]):
        raise MoeLMError(f"dry run: the loss has shape {tuple(loss.shape)}, expected a scalar.")
    loss.backward()
    bad = [name for name, p in model.named_parameters()
           if p.grad is None or p.grad.shape != p.shape]
    if bad:
        raise MoeLMError(f"dry run: {len(bad)} parameters got no gradient of their shape after "
                         f"backward (first: {bad[:3]}); the model does not use them.")
    return {
        "dry_run": "ok",
        "params": sum(p.numel() for p in model.parameters()),
        "moe_layers": len(out.moe_stats),  # applied MoE layers (a shared block counts each use)
        "micro_batch": [B, S],
        "hidden_shape": list(out.hidden.shape) if out.hidden is not None else None,
        "activation_checkpointing": cfg.trainer.activation_checkpointing,
        "seconds": round(time.time() - start, 2),
    }


def run_dry_run(cfg: TrainConfig, run_dir) -> dict[str, Any]:
    """The `trainer.dry_run=true` run (`moe_lm.runs.train_job.run`): resolves the vocabulary,
    runs `dry_run`, prints and writes `<run dir>/dry_run.json`."""
    result = dry_run(with_tokenizer_vocab(cfg))
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    path = Path(run_dir) / "dry_run.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"dry run ok: forward + backward of {result['params']:,} parameters "
          f"({result['moe_layers']} MoE layers) on the meta device, micro-batch "
          f"{result['micro_batch'][0]} x {result['micro_batch'][1]} tokens, activation "
          f"checkpointing {result['activation_checkpointing']}, {result['seconds']} s\n"
          f"dry_run.json: {path.resolve()}", flush=True)
    return {**result, "step": 0}


def loss_term_names(cfg: TrainConfig) -> list[str]:
    """The names of the loss terms a training step of `cfg` logs, in order: the model's (found by
    a shape-only forward of its first MoE layer) and the extra objectives'."""
    m = cfg.model
    n_layers = min(m.n_layers, m.n_dense_layers + 1)  # the layer pattern's first MoE layer
    small = replace(cfg, model=replace(m, n_layers=n_layers, share_layers=1,
                                       vocab_size=max(m.vocab_size, 8)))
    model = build_meta_model(planning_config(small))
    use_balanced_routing(model)
    tokens_BS1 = torch.zeros((1, 3), dtype=torch.int64, device="meta")
    with torch.no_grad():
        result = forward_backward(model, tokens_BS1, None, "meta", backward=False)
    return list(result.out.terms) + objective_term_names(cfg.loss)
