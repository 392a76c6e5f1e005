"""Checkpoints in torch.distributed.checkpoint format, written atomically, found and checked on resume.

Layout: `<run>/checkpoints/step_NNNNNNN/` holds the DCP files (model + optimizer, sharded by rank),
`trainer_state.pt` (step, scheduler, data position, RNG states per rank) and, written last,
`meta.json` (model shape, tokenizer, the size of every file). A checkpoint is written under a
hidden temporary name and renamed into place, so a killed save never looks complete; a checkpoint
whose files do not match `meta.json` (truncated, missing) is skipped with a warning.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from moe_lm.config import ModelConfig
from moe_lm.errors import CheckpointError
from moe_lm.training import distributed as dist_utils

STEP_PREFIX = "step_"


@dataclass
class Checkpoint:
    """A complete checkpoint on disk."""

    path: Path
    step: int
    meta: dict[str, Any]


def model_identity(cfg, tokenizer_name: str) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the model config, expert shape and tokenizer."""
    return {"model": asdict(cfg.model), "num_experts": cfg.expert.num_experts,
            "expert_hidden": cfg.expert.hidden_size, "num_shared": cfg.expert.num_shared,
            "tokenizer": tokenizer_name}


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], identity: dict[str, Any], keep_last: int) -> Path:
    """Writes checkpoint `step` atomically (all ranks call this) and prunes to `keep_last`."""
    tmp, final = _begin(run_dir, step)
    state = {"model": get_model_state_dict(model),
             "optim": get_optimizer_state_dict(model, optimizer)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(tmp))
    rank_state = {"rng_cpu": torch.get_rng_state(),
                  "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save(rank_state, tmp / f"rng_rank{dist_utils.rank()}.pt")
    dist_utils.barrier()
    if dist_utils.is_rank0():
        torch.save(trainer_state, tmp / "trainer_state.pt")
        _finish(tmp, final, {"step": step, "identity": identity,
                             "world_size": dist_utils.world_size()}, keep_last)
    dist_utils.barrier()
    return final


class _LazySavePlanner(DefaultSavePlanner):
    """Plans from shape-only (meta) tensors and makes each real tensor only when DCP writes it."""

    def __init__(self, produce: Callable[[str], torch.Tensor]):
        super().__init__()
        self.produce = produce

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        return self.produce(write_item.index.fqn)


def save_weights(run_dir: Path, step: int, shapes: dict[str, torch.Tensor],
                 produce: Callable[[str], torch.Tensor], identity: dict[str, Any]) -> Path:
    """Writes a model-only checkpoint (one process) without holding the state dict in memory.

    `shapes` maps each `model.<name>` key to a meta tensor of its shape and dtype; `produce(key)`
    returns the real tensor when DCP writes it, so at most one tensor is alive at a time (one file
    per tensor: DCP keeps every tensor of a file alive until the file is done). The checkpoint has
    no optimizer state (`meta.json`: `"weights_only": true`): training from it starts a fresh
    optimizer and schedule, and the tools read it like any other.
    """
    tmp, final = _begin(run_dir, step)
    writer = dcp.FileSystemWriter(str(tmp), single_file_per_rank=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": shapes}, storage_writer=writer, planner=_LazySavePlanner(produce),
                 no_dist=True)
    torch.save({"step": step, "weights_only": True}, tmp / "trainer_state.pt")
    _finish(tmp, final, {"step": step, "identity": identity, "world_size": 1,
                         "weights_only": True}, keep_last=1)
    return final


def _begin(run_dir: Path, step: int) -> tuple[Path, Path]:
    root = checkpoint_dir(run_dir)
    final = root / f"{STEP_PREFIX}{step:07d}"
    tmp = root / f".tmp_{STEP_PREFIX}{step:07d}"
    if dist_utils.is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist_utils.barrier()
    return tmp, final


def _finish(tmp: Path, final: Path, meta: dict[str, Any], keep_last: int) -> None:
    """meta.json (with every file's size) written last, then the rename that makes it complete."""
    meta = {**meta, "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir())
                              if p.is_file()}}
    _write_synced(tmp / "meta.json", json.dumps(meta, indent=1))
    if final.exists():  # the same step saved again (a resumed run that ended where it began)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(final.parent, keep_last)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _prune(root: Path, keep_last: int) -> None:
    complete = [c.path for c in list_checkpoints(root.parent, warn=False)]
    for old in complete[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: Path, warn: bool = True) -> list[Checkpoint]:
    """Complete checkpoints, newest first; incomplete or truncated ones are skipped (warned)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.glob(f"{STEP_PREFIX}*"), reverse=True):
        problem = _completeness_problem(path)
        if problem is None:
            meta = json.loads((path / "meta.json").read_text())
            found.append(Checkpoint(path, int(meta["step"]), meta))
        elif warn:
            warnings.warn(f"skipping checkpoint {path}: {problem}; an earlier complete one is used "
                          "if there is one.", stacklevel=2)
    return found


def _completeness_problem(path: Path) -> str | None:
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return "it has no meta.json (the save did not finish)"
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
    except (json.JSONDecodeError, KeyError):
        return "its meta.json is unreadable"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"file {name} is missing"
        if f.stat().st_size != size:
            return f"file {name} is truncated ({f.stat().st_size} of {size} bytes)"
    return None


def check_identity(ckpt: Checkpoint, identity: dict[str, Any]) -> None:
    """Refuses a checkpoint made for a different model shape or tokenizer, naming the difference."""
    saved = dict(ckpt.meta.get("identity", {}))
    if isinstance(saved.get("model"), dict):  # keys added to ModelConfig later take their defaults
        saved["model"] = {**asdict(ModelConfig()), **saved["model"]}
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, this run has {v!r}"
             for k, v in identity.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(
            f"The checkpoint {ckpt.path} was made for a different model or tokenizer ("
            + "; ".join(diffs) + "). Restore those settings to resume it, or start a new run in "
            "another directory (hydra.run.dir=...).")


def load_checkpoint(ckpt: Checkpoint, model: nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Loads model and optimizer in place (any layout: DCP reshards) and returns trainer state."""
    state = {"model": get_model_state_dict(model),
             "optim": get_optimizer_state_dict(model, optimizer)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(ckpt.path))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        trainer_state = torch.load(ckpt.path / "trainer_state.pt", weights_only=False)
    except Exception as err:  # DCP raises many types for corrupt files; report one clearly
        raise CheckpointError(
            f"Could not read checkpoint {ckpt.path} ({type(err).__name__}: {err}). Delete or move "
            "that directory to resume from the previous checkpoint.") from err
    rng_file = ckpt.path / f"rng_rank{dist_utils.rank()}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: seeds stay as set
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["rng_cpu"])
        if rng["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["rng_cuda"])
    return trainer_state
