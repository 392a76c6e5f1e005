"""Starting from an existing checkpoint: finding it, its config, and its model weights.

`resolve_checkpoint` takes a run directory (its newest complete checkpoint) or one
`checkpoints/step_NNNNNNN` directory; `config_for_checkpoint` is that run's config with the model
shape the checkpoint records; `load_model_weights` reads only the model state (any layout: DCP
reads each rank's shards). The tools (moe_lm.inference) load models this way, and
`init.from_checkpoint=PATH` starts a training run from a checkpoint's weights with a fresh
optimizer and schedule (`warm_start_config`): the new run takes the checkpoint's model, its
routing (`expert.num_experts`, `top_k`, `hidden_size`, `num_shared`, `router`,
`norm_topk_prob`) and its tokenizer; everything else (data, optimizer, schedule, trainer,
parallel layout, losses, backend) is the new run's own.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from moe_lm.config import ModelConfig, TrainConfig, to_train_config, validate
from moe_lm.data.tokenizer import checkpoint_tokenizer_spec
from moe_lm.errors import CheckpointError, ConfigError, MoeLMError
from moe_lm.training.checkpoint import Checkpoint, list_checkpoints

ROUTING_KEYS = ("top_k", "router", "norm_topk_prob")  # besides the identity's expert shape


def resolve_checkpoint(path: str | Path) -> tuple[Checkpoint, Path | None]:
    """A checkpoint directory as given, or the newest complete checkpoint of a run directory.

    Returns the checkpoint and its run directory (`<run>/checkpoints/step_N` -> `<run>`).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist. Pass a run directory (the hydra.run.dir of "
                              "a training run) or one of its checkpoints/step_NNNNNNN directories.")
    if (path / "meta.json").is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        if run_dir is not None:
            for ckpt in list_checkpoints(run_dir, warn=False):
                if ckpt.path.resolve() == path.resolve():
                    return ckpt, run_dir
            raise CheckpointError(f"{path} is incomplete (its files do not match its meta.json: "
                                  "truncated or missing). Use another checkpoint of the run.")
        try:
            meta = json.loads((path / "meta.json").read_text())
            return Checkpoint(path, int(meta["step"]), meta), None
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{path}/meta.json is unreadable ({err}); the checkpoint is "
                                  "incomplete. Use another checkpoint of the run.") from err
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise CheckpointError(
            f"{path} holds no complete checkpoint (expected {path}/checkpoints/step_NNNNNNN/ with a "
            "meta.json, or a checkpoint directory itself). Train with trainer.ckpt_every set, or "
            "pass the checkpoint directory.")
    return ckpts[0], path


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



def load_model_weights(ckpt: Checkpoint, model: torch.nn.Module) -> None:
    """Reads the model's parameters and buffers from a DCP checkpoint into `model`, in place."""
    state = {"model": get_model_state_dict(model)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(ckpt.path))
        set_model_state_dict(model, state["model"])
    except Exception as err:  # DCP raises many types; report one clearly
        raise CheckpointError(
            f"Could not load the model weights of {ckpt.path} ({type(err).__name__}: {err}). The "
            "files may be truncated, or the model code no longer matches the checkpoint.") from err


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
