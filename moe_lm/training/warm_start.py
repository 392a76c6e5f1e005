"""`init.from_checkpoint=PATH`: a new training run that starts from a checkpoint's weights.

The new run takes the checkpoint's model, its routing (`expert.num_experts`, `top_k`,
`hidden_size`, `num_shared`, `router`, `norm_topk_prob`) and its tokenizer; everything else (data,
optimizer, schedule, trainer, parallel layout, losses, backend) is the new run's own, and the
optimizer and schedule start fresh. The Trainer reads the weights with `load_model_weights` (any
layout: DCP reads each rank's own shards).
"""

from __future__ import annotations

from dataclasses import replace

from moe_lm.config import TrainConfig, validate
from moe_lm.training.trained_model import config_for_checkpoint, resolve_checkpoint

ROUTING_KEYS = ("top_k", "router", "norm_topk_prob")  # besides the identity's expert shape


def warm_start_config(cfg: TrainConfig) -> TrainConfig:
    """With `init.from_checkpoint`: `cfg` with the checkpoint's model, routing and tokenizer."""
    if not cfg.init.from_checkpoint:
        return cfg
    ckpt, run_dir = resolve_checkpoint(cfg.init.from_checkpoint)
    src = config_for_checkpoint(ckpt, run_dir)
    expert = replace(cfg.expert, num_experts=src.expert.num_experts,
                     hidden_size=src.expert.hidden_size, num_shared=src.expert.num_shared,
                     **{k: getattr(src.expert, k) for k in ROUTING_KEYS})
    out = replace(cfg, model=src.model, expert=expert,
                  data=replace(cfg.data, tokenizer=src.data.tokenizer))
    validate(out)
    return out
