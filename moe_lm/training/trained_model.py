"""A trained model rebuilt from its checkpoint: the checkpoint's model, config and weights.

A checkpoint's `meta.json` says what model it holds (`identity`: the model config, the expert count
and width, the tokenizer); the run's `.hydra/config.yaml` supplies the rest (router, top-k, data,
precision). Only the model's weights are read from the DCP files; the optimizer state is left on
disk. `resolve_checkpoint` accepts either path, so every tool takes `<run dir or checkpoint>`.
This is the training layer's own reader: a distillation teacher is loaded with it, and
`moe_lm.inference` builds on it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from moe_lm.config import ModelConfig, TrainConfig, to_train_config
from moe_lm.data.tokenizer import checkpoint_tokenizer_spec
from moe_lm.errors import CheckpointError, ConfigError, MoeLMError
from moe_lm.model import Transformer
from moe_lm.training.checkpoint import (
    Checkpoint,
    describe,
    inspect_one,
    list_checkpoints,
    verify_content,
)


@dataclass
class TrainedModel:
    """A checkpoint's model in eval mode, with the config it was built from."""

    model: Transformer
    cfg: TrainConfig  # the run's config, with the checkpoint's model shape
    ckpt: Checkpoint
    run_dir: Path | None  # the run directory the checkpoint belongs to (None if unknown)
    device: torch.device


def resolve_checkpoint(path: str | Path) -> tuple[Checkpoint, Path | None]:
    """A checkpoint directory as given, or the newest complete checkpoint of a run directory.

    Returns the checkpoint and its run directory (`<run>/checkpoints/step_N` -> `<run>`). The
    checkpoint's files must match the sizes and checksums recorded at save; a damaged one is an
    error (never a silent fallback to another checkpoint).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist. Pass a run directory (the hydra.run.dir of "
                              "a training run) or one of its checkpoints/step_NNNNNNN directories.")
    if (path / "meta.json").is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        item = inspect_one(path)
        if item.checkpoint is None:
            raise CheckpointError(f"{path} is damaged or incomplete: {item.problem}. Use another "
                                  "checkpoint of the run.")
        ckpt = item.checkpoint
    else:
        ckpts = list_checkpoints(path)
        if not ckpts:
            raise CheckpointError(
                f"{path} holds no complete checkpoint (expected {path}/checkpoints/step_NNNNNNN/ "
                "with a meta.json, or a checkpoint directory itself). Train with "
                "trainer.ckpt_every set, or pass the checkpoint directory.")
        ckpt, run_dir = ckpts[0], path
    problem = verify_content(ckpt)
    if problem is not None:
        raise CheckpointError(f"{ckpt.path} is damaged: {problem}. Use an older checkpoint "
                              "directory of the run (pass it instead of the run directory), or "
                              "restore the files from a copy.")
    return ckpt, run_dir


def config_for_checkpoint(ckpt: Checkpoint, run_dir: Path | None) -> TrainConfig:
    """The run's config (from `.hydra/config.yaml`) with the model shape the checkpoint records."""
    cfg_file = run_dir / ".hydra" / "config.yaml" if run_dir else None
    if cfg_file is not None and cfg_file.is_file():
        try:
            cfg = to_train_config(OmegaConf.load(cfg_file))
        except MoeLMError:
            raise
        except Exception as err:
            raise ConfigError(f"Could not read the run config {cfg_file} ({err}). Fix or restore "
                              "that file (it is written by python -m moe_lm.train).") from err
    else:
        warnings.warn(f"no .hydra/config.yaml found for {ckpt.path}; router, top-k and data "
                      "settings take their defaults.", stacklevel=2)
        cfg = TrainConfig()
    identity = ckpt.meta.get("identity")
    if not identity or "model" not in identity:
        raise CheckpointError(f"{ckpt.path}/meta.json has no model identity; it was not written by "
                              "moe_lm's checkpointing. Use a checkpoint of a moe_lm run.")
    model_cfg = ModelConfig(**identity["model"])
    expert_cfg = replace(cfg.expert, num_experts=identity["num_experts"],
                         hidden_size=identity["expert_hidden"], num_shared=identity["num_shared"])
    expert_cfg = replace(expert_cfg, top_k=min(expert_cfg.top_k, expert_cfg.num_experts))
    data_cfg = replace(cfg.data, tokenizer=checkpoint_tokenizer_spec(
        identity["tokenizer"], cfg.data.tokenizer, run_dir))
    return replace(cfg, model=model_cfg, expert=expert_cfg, data=data_cfg)


def pick_device(name: str) -> torch.device:
    """`auto` is CUDA where present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is visible: use --device cpu.")
    return torch.device(name)


def load_model_weights(ckpt: Checkpoint, model: torch.nn.Module) -> None:
    """Reads the model's parameters and buffers from a DCP checkpoint into `model`, in place."""
    state = {"model": get_model_state_dict(model)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(ckpt.path))
        set_model_state_dict(model, state["model"])
    except (Exception, CheckpointException) as err:  # DCP raises many types; report one clearly
        raise CheckpointError(
            f"Could not load the model weights of {ckpt.path} ({describe(err)}). The files may be "
            "damaged, or the model code no longer matches the checkpoint.") from None


def load_trained_model(path: str | Path, device: str = "auto",
                       backend: str | None = None) -> TrainedModel:
    """Builds the checkpoint's model and loads its weights (model state only), in eval mode.

    `backend` picks the expert backend; by default the run's on CUDA and `torch` on CPU.
    """
    ckpt, run_dir = resolve_checkpoint(path)
    cfg = config_for_checkpoint(ckpt, run_dir)
    dev = pick_device(device)
    chosen = backend or (cfg.expert.backend if dev.type == "cuda" else "torch")
    cfg = replace(cfg, expert=replace(cfg.expert, backend=chosen))
    model = Transformer(cfg.model, cfg.expert, cfg.loss)
    load_model_weights(ckpt, model)
    return TrainedModel(model.to(dev).eval(), cfg, ckpt, run_dir, dev)
