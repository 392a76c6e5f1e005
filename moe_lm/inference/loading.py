"""Loading a trained model for inference: from a run directory or one checkpoint directory.

`moe_lm.training.trained_model` rebuilds the model from its checkpoint; this adds the tokenizer
the tools need to run it on text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moe_lm.config import TrainConfig
from moe_lm.data import Tokenizer, get_tokenizer
from moe_lm.model import Transformer
from moe_lm.training.checkpoint import Checkpoint
from moe_lm.training.trained_model import load_trained_model


@dataclass
class LoadedModel:
    """A model in eval mode with everything needed to run it on text."""

    model: Transformer
    cfg: TrainConfig  # the run's config, with the checkpoint's model shape
    tokenizer: Tokenizer
    ckpt: Checkpoint
    run_dir: Path | None  # the run directory the checkpoint belongs to (None if unknown)
    device: torch.device


def load_model(path: str | Path, device: str = "auto", backend: str | None = None) -> LoadedModel:
    """Builds the checkpoint's model and loads its weights (model state only), in eval mode.

    `backend` picks the expert backend; by default the run's on CUDA and `torch` on CPU.
    """
    trained = load_trained_model(path, device, backend)
    tokenizer = get_tokenizer(trained.cfg.data.tokenizer)
    return LoadedModel(trained.model, trained.cfg, tokenizer, trained.ckpt, trained.run_dir,
                       trained.device)
