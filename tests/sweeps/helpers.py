"""Running sweeps in tests: `python -m moe_lm.train -m` as a subprocess into a chosen sweep dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def multirun_cli(sweep_dir: Path, overrides: list[str], timeout: float = 240,
                 extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs a local Hydra multirun of moe_lm.train writing into `sweep_dir`; returns its result."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    cmd = [sys.executable, "-m", "moe_lm.train", "-m", f"hydra.sweep.dir={sweep_dir}", *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def report_row(report_md: str, job_num: int) -> list[str]:
    """The cells of one job's row in report.md's table."""
    for line in report_md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == str(job_num):
            return cells
    raise AssertionError(f"job {job_num} has no row in:\n{report_md}")
