"""Checkpoints in torch.distributed.checkpoint format, written atomically, found and checked on resume.

Layout: `<run>/checkpoints/step_NNNNNNN/` holds the DCP files (model + optimizer, sharded by rank),
`trainer_state.pt` (step, scheduler, data position), `rng_rank<R>.pt` and, written last,
`meta.json` (step, model identity, the run's config, and the size and xxHash3-128 digest of every
file). A checkpoint is written under `.tmp_step_NNNNNNN`, fsynced and renamed into place (the
directory fsynced after the rename), so a killed save never looks complete; a failed save removes
its temporary directory. Pruning renames a checkpoint to `.pruning_step_NNNNNNN` before deleting
it, so a kill during pruning leaves a name the next start removes, never a half `step_*`.

Checks, cheapest first: `meta.json` of the right shape, every file present at its recorded size
(`inspect_checkpoints`), then every file's digest (`verify_content`, read by all ranks in parallel).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from moe_lm.config import ModelConfig
from moe_lm.errors import CheckpointError, DiskFullError
from moe_lm.training import checksums
from moe_lm.training import distributed as dist_utils

STEP_PREFIX = "step_"
STEP_NAME = re.compile(r"step_(\d+)")
TMP_PREFIX = ".tmp_"
PRUNING_PREFIX = ".pruning_"
SUPERSEDED_PREFIX = "superseded_"
FULL_DISK_BYTES = 16 * 2**20  # less free space than this when a save fails: the disk is full


# optimizer state keyed by parameter name (`optim.state.<fqn>.<key>`, `optim.param_groups.<fqn>.
# <key>`): every rank saves the entries of its own parameters, so a pipeline rank's share (which
# holds some of the parameters only) is a part of the one-process checkpoint, and back
FLAT_OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)


@dataclass
class Checkpoint:
    """A checkpoint on disk whose `meta.json` and file sizes passed the checks."""

    path: Path
    step: int
    meta: dict[str, Any]


def model_identity(cfg, tokenizer_name: str) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the model config, expert shape and tokenizer."""
    return {"model": asdict(cfg.model), "num_experts": cfg.expert.num_experts,
            "expert_hidden": cfg.expert.hidden_size, "num_shared": cfg.expert.num_shared,
            "tokenizer": tokenizer_name}


@dataclass
class Inspection:
    """A `step_*` directory and what is wrong with it (`problem` None: it looks complete)."""

    path: Path
    problem: Optional[str]
    checkpoint: Optional[Checkpoint]


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], identity: dict[str, Any], keep_last: int,
                    config: Optional[dict[str, Any]] = None) -> Path:
    """Writes checkpoint `step` atomically (all ranks call this) and prunes to `keep_last`.

    `config` (the run's effective config) is recorded so a resume can name what changed. A failed
    save (full disk, I/O error) removes its temporary directory and raises CheckpointError (or
    DiskFullError), leaving every earlier checkpoint as it was.
    """
    root = checkpoint_dir(run_dir)
    final = root / f"{STEP_PREFIX}{step:07d}"
    tmp = root / f"{TMP_PREFIX}{STEP_PREFIX}{step:07d}"
    try:
        if dist_utils.is_rank0():
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        dist_utils.barrier()
        _write_files(tmp, model, optimizer, trainer_state)
        dist_utils.barrier()
        names = sorted(p.name for p in tmp.iterdir() if p.is_file())
        digests = checksums.digests(tmp, names)
        if dist_utils.is_rank0():
            files = {n: {"size": (tmp / n).stat().st_size, checksums.ALGORITHM: digests[n]}
                     for n in names}
            meta = {"step": step, "identity": identity, "config": config, "files": files,
                    "world_size": dist_utils.world_size()}
            write_synced(tmp / "meta.json", json.dumps(meta, indent=1, default=str))
            _set_aside(final)
            os.replace(tmp, final)
            fsync_dir(root)
            _prune(root, keep_last)
    except (Exception, CheckpointException) as err:
        free = _free_bytes(root)  # before the cleanup frees space again
        shutil.rmtree(tmp, ignore_errors=True)
        raise save_error(err, final, free) from err
    dist_utils.barrier()
    return final


def _write_files(tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 trainer_state: dict[str, Any]) -> None:
    state = {"model": get_model_state_dict(model),
             "optim": get_optimizer_state_dict(model, optimizer, options=FLAT_OPTIM)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(tmp))  # its FileSystemWriter fsyncs each file
    rank_state = {"rng_cpu": torch.get_rng_state(),
                  "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    _save_synced(rank_state, tmp / f"rng_rank{dist_utils.rank()}.pt")
    if dist_utils.is_rank0():
        _save_synced(trainer_state, tmp / "trainer_state.pt")


def root_causes(err: BaseException) -> list[BaseException]:
    """The exceptions behind `err`: a DCP CheckpointException's per-rank failures, and causes."""
    found: list[BaseException] = []
    todo = [err]
    while todo:
        e = todo.pop()
        if isinstance(e, CheckpointException):
            todo.extend(f[0] if isinstance(f, tuple) else f for f in e.failures.values())
            continue
        found.append(e)
        if e.__cause__ is not None:
            todo.append(e.__cause__)
    return found


def describe(err: BaseException) -> str:
    """One line for an error, with DCP's per-rank tracebacks reduced to their messages."""
    causes = root_causes(err)
    return "; ".join(dict.fromkeys(f"{type(c).__name__}: {c}" for c in causes)) or repr(err)


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return -1


def as_user_error(err: BaseException) -> BaseException:
    """DCP's CheckpointException (a BaseException, its message a stack of per-rank tracebacks)
    as one CheckpointError paragraph; any other error unchanged."""
    if isinstance(err, CheckpointException):
        return CheckpointError(f"A checkpoint read or write failed ({describe(err)}). Check the "
                               "run directory's filesystem, then run the same command to resume.")
    return err


def save_error(err: BaseException, final: Path, free: int) -> CheckpointError:
    """The error a failed save raises: a full disk says so, and how much to free.

    A full disk is an ENOSPC / EDQUOT among the causes, or (torch.save's zip writer reports a
    failed write as "unexpected pos", without the errno) under FULL_DISK_BYTES left when it
    failed."""
    if isinstance(err, CheckpointError):
        return err
    if 0 <= free < FULL_DISK_BYTES or any(
            isinstance(c, OSError) and c.errno in (errno.ENOSPC, errno.EDQUOT)
            for c in root_causes(err)):
        need = max((sum(_entry_size(e) for e in c.meta["files"].values())
                    for c in list_checkpoints(final.parent.parent, warn=False)), default=0)
        return DiskFullError(
            f"No space left on device while saving checkpoint {final.name} in {final.parent} "
            f"({max(free, 0) / 2**30:.2f} GiB were free at the failure; one checkpoint takes "
            f"{need / 2**30:.2f} GiB; {describe(err)}). The "
            "partial save was removed and the earlier checkpoints are intact. Free at least that "
            "much on that filesystem (or lower trainer.keep_last), then run the same command "
            "again to resume.")
    return CheckpointError(
        f"Saving checkpoint {final} failed ({describe(err)}). The partial save was removed and "
        "the earlier checkpoints are intact; fix the cause and run the same command to resume.")


def write_synced(path: Path, text: str) -> None:
    """Writes `text` to `path` and fsyncs it (the file is durable before it is renamed)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _save_synced(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Makes a rename inside `path` durable (POSIX: the directory entry is data of the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _set_aside(final: Path) -> None:
    """A checkpoint already at this step (e.g. one that failed its checks) is renamed, not
    deleted: it may still hold recoverable weights."""
    if not final.exists():
        return
    k = 1
    while (target := final.parent / f"{SUPERSEDED_PREFIX}{final.name}_{k}").exists():
        k += 1
    os.replace(final, target)
    warnings.warn(f"{final} already existed and was renamed to {target} (it is no longer used; "
                  "delete it once you no longer need it).", stacklevel=3)


def _prune(root: Path, keep_last: int) -> None:
    for ckpt in list_checkpoints(root.parent, warn=False)[keep_last:]:
        remove_checkpoint(ckpt.path)


def remove_checkpoint(path: Path) -> None:
    """Deletes a checkpoint: first renamed to `.pruning_*` (atomic), so a kill mid-delete never
    leaves a partial `step_*` directory that looks like a damaged checkpoint."""
    doomed = path.parent / f"{PRUNING_PREFIX}{path.name}"
    os.replace(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Deletes what killed saves and prunes left (`.tmp_step_*`, `.pruning_step_*`); returns them.

    Only call this while holding the run directory's lock (no other run may be saving).
    """
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    gone = [p for prefix in (TMP_PREFIX, PRUNING_PREFIX) for p in root.glob(f"{prefix}{STEP_PREFIX}*")]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def inspect_checkpoints(run_dir: Path) -> list[Inspection]:
    """Every `step_NNNNNNN` directory, newest first, with what is wrong with it (cheap checks)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if STEP_NAME.fullmatch(p.name)]
    return [inspect_one(path) for path in
            sorted(dirs, key=lambda p: int(STEP_NAME.fullmatch(p.name).group(1)), reverse=True)]


def inspect_one(path: Path) -> Inspection:
    """The cheap checks of one checkpoint directory: meta.json's shape, every file's size."""
    meta, problem = _read_meta(path)
    if problem is None:
        problem = _files_problem(path, meta["files"])
    return Inspection(path, problem, None if problem else Checkpoint(path, int(meta["step"]), meta))


def list_checkpoints(run_dir: Path, warn: bool = True) -> list[Checkpoint]:
    """Checkpoints that pass the cheap checks, newest first; the others are skipped (warned)."""
    found = []
    for item in inspect_checkpoints(run_dir):
        if item.checkpoint is not None:
            found.append(item.checkpoint)
        elif warn:
            warnings.warn(f"skipping checkpoint {item.path}: {item.problem}; an earlier complete "
                          "one is used if there is one.", stacklevel=2)
    return found


def verify_content(ckpt: Checkpoint) -> Optional[str]:
    """What is wrong with the checkpoint's bytes (digest mismatch), or None. All ranks call it."""
    bad = checksums.mismatches(ckpt.path, ckpt.meta["files"])
    if not bad:
        return None
    return (f"the content of {', '.join(bad)} does not match the checksum recorded at save "
            "(corrupted on disk)")


def _read_meta(path: Path) -> tuple[dict[str, Any], Optional[str]]:
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return {}, "it has no meta.json (the save did not finish, or the file was removed)"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        return {}, f"its meta.json is unreadable ({err})"
    if not (isinstance(meta, dict) and isinstance(meta.get("step"), int)
            and isinstance(meta.get("files"), dict) and isinstance(meta.get("identity", {}), dict)
            and all(isinstance(e, int) or (isinstance(e, dict) and isinstance(e.get("size"), int))
                    for e in meta["files"].values())):
        return {}, ("its meta.json has the wrong shape (expected an object with an integer "
                    "'step', an 'identity' object and 'files': {name: {size, digest}})")
    return meta, None


def _entry_size(entry: Any) -> int:
    return entry if isinstance(entry, int) else entry["size"]  # int: written before checksums


def _files_problem(path: Path, files: dict[str, Any]) -> Optional[str]:
    for name, entry in files.items():
        f, size = path / name, _entry_size(entry)
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


def _flat_optim(path: Path) -> bool:
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return not any(k.startswith("optim.param_groups.0.") for k in keys)


def load_checkpoint(ckpt: Checkpoint, model: nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Loads model and optimizer in place (any layout: DCP reshards) and returns trainer state."""
    try:
        # checkpoints written before the flat layout index the param groups by number
        options = FLAT_OPTIM if _flat_optim(ckpt.path) else StateDictOptions()
        state = {"model": get_model_state_dict(model),
                 "optim": get_optimizer_state_dict(model, optimizer, options=options)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(ckpt.path))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"], options=options)
        trainer_state = torch.load(ckpt.path / "trainer_state.pt", weights_only=False)
    # DCP raises many types for corrupt files, CheckpointException (a BaseException) among them
    except (Exception, CheckpointException) as err:
        raise CheckpointError(
            f"Could not read checkpoint {ckpt.path} ({describe(err)}). Delete or move that "
            "directory to resume from the previous checkpoint.") from None
    rng_file = ckpt.path / f"rng_rank{dist_utils.rank()}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: seeds stay as set
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["rng_cpu"])
        if rng["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["rng_cuda"])
    return trainer_state
