"""What a sweep job leaves behind besides its metrics: `status.json`, and its wandb group and name.

Every run directory gets a `status.json` (written by rank 0) that says how the run ended:

    {"status": "running" | "completed" | "stopped" | "failed", "overrides": [...],
     "job_num": 3, "step": 300, "val_loss": 4.71, "error": "...", "started": ..., "finished": ...}

`completed` means the run reached `trainer.stop_at` / `trainer.max_steps` (exit code 0); `stopped`
means it ended early on SIGTERM after checkpointing `step` (exit code `EXIT_STOPPED` = 143; it
resumes when restarted in the same directory; `val_loss` is that of the last eval, at `val_step`);
`failed` (exit code 2 for a moe_lm error, 1 for a crash) holds the error
message; a `running` file whose process is gone is a run that was killed (out of memory, node
lost). `moe_lm.report` reads these files, so a failed or killed sweep job is listed, never skipped.

The entry point reads Hydra's runtime info and passes plain values here; nothing below it imports
Hydra.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

STATUS_FILE = "status.json"
EXIT_STOPPED = 128 + signal.SIGTERM  # 143: stopped by SIGTERM, checkpointed, resumable
STATUSES = ("running", "completed", "stopped", "failed")
WANDB_GROUP_MAX = 128  # wandb rejects longer group names


def write_status(run_dir: Path, status: str, **fields: Any) -> dict[str, Any]:
    """Writes `<run_dir>/status.json` atomically, keeping the fields of an earlier write.

    Later writes update earlier ones, so `start` can record the overrides and `finish` the outcome.
    Returns the record written.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = read_status(run_dir) or {}
    record.update(fields)
    record["status"] = status
    tmp = run_dir / f".{STATUS_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, run_dir / STATUS_FILE)
    return record


def read_status(run_dir: Path) -> Optional[dict[str, Any]]:
    """The run's status record, or None when it has none (or it is unreadable)."""
    path = Path(run_dir) / STATUS_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def start_job(run_dir: Path, overrides: list[str], job_num: Optional[int]) -> None:
    """Marks the run as running and records its overrides (the report's row label).

    `job_num` is the sweep job's number; None (a single run, or a SLURM job's torchrun workers)
    keeps the number an earlier write recorded.
    """
    fields: dict[str, Any] = {"overrides": list(overrides), "started": time.time(),
                              "finished": None, "error": None}
    if job_num is not None:
        fields["job_num"] = job_num
    write_status(run_dir, "running", **fields)


def finish_job(run_dir: Path, result: dict[str, Any], end_step: int) -> str:
    """Records a run that returned: `completed` at `end_step`, `stopped` before it (SIGTERM).

    Returns the status written.
    """
    step = int(result.get("step", 0))
    status = "completed" if step >= end_step else "stopped"
    write_status(run_dir, status, step=step, val_loss=result.get("val_loss"),
                 val_step=result.get("val_step", step), finished=time.time())
    return status


def fail_job(run_dir: Path, err: BaseException) -> None:
    """Records a run that raised, with the error's type and message (BaseExceptions included).

    A status that cannot be written (the disk is full) is reported on stderr instead of hiding
    the run's own error."""
    message = str(err).strip() or repr(err)
    try:
        write_status(run_dir, "failed", error=f"{type(err).__name__}: {message}",
                     finished=time.time())
    except OSError as write_err:
        print(f"moe_lm: could not record the failure in {Path(run_dir) / STATUS_FILE} "
              f"({write_err.strerror})", file=sys.stderr, flush=True)


def wandb_group(sweep_dir: str) -> str:
    """A sweep's wandb group: the last two parts of its directory (e.g. `sweep_router/2025-..`).

    Every job of one sweep shares its sweep directory, so they share the group; two sweeps never
    share a directory, so they never share a group.
    """
    parts = [p for p in Path(str(sweep_dir)).parts if p not in ("/", "")]
    group = "/".join(parts[-2:]) or "sweep"
    return group[-WANDB_GROUP_MAX:]


def wandb_job_name(override_dirname: str, job_num: Optional[int]) -> str:
    """A sweep job's wandb name: its overrides (`expert=top2,optim.lr=0.001`), or `job<N>`."""
    return override_dirname or f"job{job_num if job_num is not None else 0}"
