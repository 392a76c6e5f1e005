"""`trainer.final_weights_only=true`: a finished run keeps only its final model weights.

A full checkpoint holds the model and AdamW's two moments (about three times the weights), and
`trainer.keep_last` of them. When a run reaches `trainer.max_steps` with this option, its newest
checkpoint is rewritten with the model state only (same DCP format, so eval, generate, export_hf,
prune and quantize load it unchanged) and every older checkpoint is removed. The weights-only
checkpoint is written beside the full one and swapped in only when complete, so a crash leaves
the full checkpoint. It cannot be resumed (no optimizer state): `meta.json` says
`"weights_only": true, "final_weights": true` and the trainer refuses it with what to do instead.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from moe_lm.errors import CheckpointError
from moe_lm.training import distributed as dist_utils
from moe_lm.training.checkpoint import Checkpoint, checkpoint_dir, list_checkpoints

KEPT_FILES = ("trainer_state.pt",)  # the step and data position, for the summary and tools


def keep_final_weights_only(run_dir: Path, model: nn.Module) -> Path:
    """Rewrites the newest checkpoint as weights only and removes the others (all ranks call)."""
    newest = list_checkpoints(run_dir, warn=False)[0]
    tmp = checkpoint_dir(run_dir) / f".tmp_weights_{newest.path.name}"
    if dist_utils.is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist_utils.barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(tmp))
    dist_utils.barrier()
    if dist_utils.is_rank0():
        for name in KEPT_FILES:
            shutil.copy2(newest.path / name, tmp / name)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {**newest.meta, "files": files, "weights_only": True, "final_weights": True}
        with open(tmp / "meta.json", "w") as f:
            f.write(json.dumps(meta, indent=1))
            f.flush()
            os.fsync(f.fileno())
        old = newest.path.with_name(f".old_{newest.path.name}")
        os.replace(newest.path, old)
        os.replace(tmp, newest.path)
        shutil.rmtree(old)
        for other in list_checkpoints(run_dir, warn=False)[1:]:
            shutil.rmtree(other.path)
    dist_utils.barrier()
    return newest.path


def refuse_weights_only(ckpt: Checkpoint) -> None:
    """Raises CheckpointError for a finished run's final weights, which it cannot resume (other
    weights-only checkpoints are starting points: `Trainer.start_from`)."""
    if ckpt.meta.get("final_weights"):
        raise CheckpointError(
            f"{ckpt.path} holds the final weights only (the run used "
            "trainer.final_weights_only=true): it has no optimizer state to resume from. The run "
            f"is complete at step {ckpt.step}; evaluate or export it, or train on in a new run "
            "directory (hydra.run.dir=...), e.g. from it as a teacher with loss=distill.")
