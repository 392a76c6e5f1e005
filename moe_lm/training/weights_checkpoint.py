"""Weights-only checkpoints written tensor by tensor (what `moe_lm.import_hf` writes).

The same directory layout, checksums and atomic publish as `checkpoint.save_checkpoint`, but
without an optimizer, and without ever holding the whole state dict: DCP plans from shape-only
tensors and each real tensor is produced only when DCP writes it.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItemType

from moe_lm.training import checksums
from moe_lm.training.checkpoint import (STEP_PREFIX, TMP_PREFIX, _free_bytes, _save_synced,
                                        _set_aside, checkpoint_dir, fsync_dir, save_error,
                                        write_synced)


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
    root = checkpoint_dir(run_dir)
    final = root / f"{STEP_PREFIX}{step:07d}"
    tmp = root / f"{TMP_PREFIX}{STEP_PREFIX}{step:07d}"
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        writer = dcp.FileSystemWriter(str(tmp), single_file_per_rank=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.save({"model": shapes}, storage_writer=writer, planner=_LazySavePlanner(produce),
                     no_dist=True)
        _save_synced({"step": step, "weights_only": True}, tmp / "trainer_state.pt")
        names = sorted(p.name for p in tmp.iterdir() if p.is_file())
        digests = checksums.digests(tmp, names)
        files = {n: {"size": (tmp / n).stat().st_size, checksums.ALGORITHM: digests[n]}
                 for n in names}
        meta = {"step": step, "identity": identity, "files": files, "world_size": 1,
                "weights_only": True}
        write_synced(tmp / "meta.json", json.dumps(meta, indent=1, default=str))
        _set_aside(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except (Exception, CheckpointException) as err:
        free = _free_bytes(root)
        shutil.rmtree(tmp, ignore_errors=True)
        raise save_error(err, final, free) from err
    return final
