"""Loading a trained model for inference: from a run directory or one checkpoint directory.

A checkpoint's `meta.json` says what model it holds (`identity`: the model config, the expert count
and width, the tokenizer); the run's `.hydra/config.yaml` supplies the rest (router, top-k, data,
precision). Only the model's weights are read from the DCP files; the optimizer state is left on
disk. `resolve_checkpoint` accepts either path, so every tool takes `<run dir or checkpoint>`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from moe_lm.config import TrainConfig
from moe_lm.data import Tokenizer, get_tokenizer
from moe_lm.errors import ConfigError
from moe_lm.model import Transformer
from moe_lm.training.checkpoint import Checkpoint
from moe_lm.training.warm_start import config_for_checkpoint, load_model_weights, resolve_checkpoint

__all__ = ["LoadedModel", "config_for_checkpoint", "load_model", "load_model_weights",
           "pick_device", "resolve_checkpoint"]


@dataclass
class LoadedModel:
    """A model in eval mode with everything needed to run it on text."""

    model: Transformer
    cfg: TrainConfig  # the run's config, with the checkpoint's model shape
    tokenizer: Tokenizer
    ckpt: Checkpoint
    run_dir: Path | None  # the run directory the checkpoint belongs to (None if unknown)
    device: torch.device


def pick_device(name: str) -> torch.device:
    """`auto` is CUDA where present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is visible: use --device cpu.")
    return torch.device(name)


def load_model(path: str | Path, device: str = "auto", backend: str | None = None) -> LoadedModel:
    """Builds the checkpoint's model and loads its weights (model state only), in eval mode.

    `backend` picks the expert backend; by default the run's on CUDA and `torch` on CPU.
    """
    ckpt, run_dir = resolve_checkpoint(path)
    cfg = config_for_checkpoint(ckpt, run_dir)
    dev = pick_device(device)
    chosen = backend or (cfg.expert.backend if dev.type == "cuda" else "torch")
    cfg = replace(cfg, expert=replace(cfg.expert, backend=chosen))
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    model = Transformer(cfg.model, cfg.expert, cfg.loss)
    load_model_weights(ckpt, model)
    return LoadedModel(model.to(dev).eval(), cfg, tokenizer, ckpt, run_dir, dev)
