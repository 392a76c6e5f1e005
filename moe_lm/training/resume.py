"""Which checkpoint a run resumes from, and what it does with config keys changed since the save.

`trainer.resume`: `auto` (default) resumes from the newest checkpoint that passes every check
(meta.json, file sizes, content checksums) and starts fresh only where there is no checkpoint at
all; when checkpoints exist but none passes, the run refuses to start and lists each one with its
problem, so recoverable weights are never trained over. `must` also refuses an empty directory.
`never` starts fresh after moving the old `checkpoints/` and `metrics.jsonl` to
`<run>/superseded_<N>/` (nothing is deleted).

Changed keys: the checkpoint records the config it was trained with. On resume each key that
differs is applied (`APPLIED`: the optimizer's hyperparameters, the schedule's length, loss weights,
precision, layout and backend: they take effect from the next step and are printed), has no effect
on the trajectory (`NO_EFFECT`: logging, eval and checkpoint cadence; `data.batch_size` is per
rank, and the loop checks the global batch, batch size x ranks, itself) or is refused (everything else:
the data layout `data.seq_len`, `data.path`, `trainer.seed`, routing `expert.top_k`, ...), unless
named in `trainer.resume_allow_changes=[key,...]`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from moe_lm.config import TrainConfig
from moe_lm.errors import CheckpointError, ConfigError
from moe_lm.training import distributed as dist_utils
from moe_lm.training.checkpoint import (
    Checkpoint,
    check_identity,
    checkpoint_dir,
    inspect_checkpoints,
    remove_leftovers,
    verify_content,
)

APPLIED = ("optim.", "trainer.max_steps", "trainer.grad_accum", "trainer.precision",
           "trainer.activation_checkpointing", "trainer.compile", "trainer.device",
           "loss.aux_coef", "loss.z_coef", "loss.distill_coef", "loss.distill_temperature",
           "loss.mtp_coef", "expert.backend", "parallel.")
NO_EFFECT = ("trainer.log_every", "trainer.eval_every", "trainer.eval_batches",
             "trainer.ckpt_every", "trainer.keep_last", "trainer.monitor.", "trainer.dry_run",
             "trainer.collective_timeout_s", "trainer.stop_at", "trainer.resume",
             "trainer.resume_allow_changes", "data.cache_dir", "logger.", "plan.",
             "data.batch_size")  # per rank: the global batch is what the resume checks

SUPERSEDED = "superseded_"
OPTIM_HPARAMS = ("weight_decay", "betas", "eps", "initial_lr")


def pick_resume_checkpoint(run_dir: Path, cfg: TrainConfig,
                           identity: dict[str, Any]) -> Optional[Checkpoint]:
    """The checkpoint this run resumes from (None: a fresh start), checked against the run.

    First removes what killed saves and prunes left (the caller holds the run lock). Raises
    CheckpointError for a different model (identity) or refused config changes."""
    if dist_utils.is_rank0():
        for gone in remove_leftovers(run_dir):
            print(f"removed {gone} (left by a killed save or prune)", flush=True)
    dist_utils.barrier()
    ckpt = choose_checkpoint(run_dir, cfg.trainer.resume)
    if ckpt is not None:
        check_identity(ckpt, identity)
        check_config_changes(ckpt, cfg)
    return ckpt


def choose_checkpoint(run_dir: Path, mode: str) -> Optional[Checkpoint]:
    """The checkpoint to resume from under `trainer.resume=mode`, or None to start fresh.

    All ranks call this (the content check is collective). Raises CheckpointError when
    checkpoints exist but none passes (listing each), or for `must` without any.
    """
    if mode == "never":
        set_aside_previous(run_dir)
        return None
    rejected: list[str] = []
    for item in inspect_checkpoints(run_dir):
        problem = item.problem or verify_content(item.checkpoint)
        if problem is None:
            for line in rejected:
                _warn(f"skipping checkpoint {line}; resuming from the older {item.path.name}.")
            return item.checkpoint
        rejected.append(f"{item.path}: {problem}")
    if rejected:
        raise CheckpointError(
            f"The run directory {run_dir} holds checkpoints but none can be resumed: "
            + "; ".join(rejected) + ". Nothing was changed. Restore the damaged files if you have "
            "a copy (or repair them), or start fresh: trainer.resume=never moves the old "
            "checkpoints and metrics to <run>/superseded_<N>/, or use a new hydra.run.dir.")
    if mode == "must":
        raise CheckpointError(f"trainer.resume=must but {run_dir} holds no checkpoint: check the "
                              "run directory, or use trainer.resume=auto to start fresh.")
    return None


def set_aside_previous(run_dir: Path) -> Optional[Path]:
    """Moves an earlier run's checkpoints and metrics to `<run>/superseded_<N>/` (rank 0)."""
    run_dir = Path(run_dir)
    old = [p for p in (checkpoint_dir(run_dir), run_dir / "metrics.jsonl") if p.exists()]
    target = None
    if old and dist_utils.is_rank0():
        n = 1 + len(list(run_dir.glob(f"{SUPERSEDED}*")))
        target = run_dir / f"{SUPERSEDED}{n}"
        target.mkdir()
        for p in old:
            os.replace(p, target / p.name)
        print(f"trainer.resume=never: moved the earlier {', '.join(p.name for p in old)} to "
              f"{target}; starting from step 0.", flush=True)
    dist_utils.barrier()
    return target


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"optim": {"lr": 1}}` -> `{"optim.lr": 1}`."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_changes(ckpt: Checkpoint, cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """`{key: (checkpoint's value, this run's)}` for every key that differs (trajectory keys)."""
    saved = ckpt.meta.get("config")
    if not isinstance(saved, dict):
        _warn(f"{ckpt.path} records no config (saved by an older moe_lm): changed settings "
              "cannot be checked on this resume.")
        return {}
    old, new = flatten(saved), flatten(asdict(cfg))
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not k.startswith(NO_EFFECT)}


def check_config_changes(ckpt: Checkpoint, cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Refuses changed keys that would silently alter the run; returns the applied changes."""
    allowed = list(cfg.trainer.resume_allow_changes)
    known = flatten(asdict(cfg))
    unknown = [k for k in allowed if k not in known]
    if unknown:
        raise ConfigError(f"trainer.resume_allow_changes names unknown keys {unknown}: use full "
                          "dotted names such as data.seq_len or expert.top_k.")
    changes = config_changes(ckpt, cfg)
    refused = {k: v for k, v in changes.items() if not k.startswith(APPLIED) and k not in allowed}
    if refused:
        listed = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in refused.items())
        raise CheckpointError(
            f"This run changes settings that the checkpoint {ckpt.path} was trained with and "
            f"that cannot change in the middle of a run ({listed}): the data order, the data "
            "layout or the routing would silently differ from the run so far. Restore them to "
            "resume, start a new run directory (hydra.run.dir=...), or accept them knowingly "
            f"with trainer.resume_allow_changes=[{','.join(refused)}].")
    for k, (a, b) in changes.items():
        note = "accepted (trainer.resume_allow_changes)" if k in allowed else "applied"
        if dist_utils.is_rank0():
            print(f"resume: {k} changed from {a!r} to {b!r}: {note} from step "
                  f"{ckpt.step + 1}.", flush=True)
    return changes


def fresh_hparams(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The optimizer's hyperparameters per group as this run's config built them (call before
    loading a checkpoint, whose param groups carry the old run's values)."""
    return [{k: g[k] for k in OPTIM_HPARAMS if k in g} for g in optimizer.param_groups]


def reapply_hparams(optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LambdaLR,
                    fresh: list[dict[str, Any]]) -> None:
    """Puts this run's hyperparameters back after a load: a new `optim.lr` is the schedule's new
    base (the step count and schedule shape continue), new weight decay, betas and eps apply."""
    for group, values in zip(optimizer.param_groups, fresh):
        group.update(values)
    scheduler.base_lrs = [v["initial_lr"] for v in fresh]
    step = scheduler.last_epoch
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports (and the loop logs) before its step


def _warn(message: str) -> None:
    if dist_utils.is_rank0():
        warnings.warn(message, stacklevel=3)
