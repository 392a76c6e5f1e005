"""Which directory a run writes to, and leaving none behind for a run that was refused.

Plans (`python -m moe_lm.plan`) and dry runs (`trainer.dry_run=true`) write under
`outputs/plans/<date>/<time>/`, away from the training runs in `outputs/<date>/<time>/`: the
`${run_kind:...}` resolver (`moe_lm.config.run_kind`) in `conf/config.yaml`'s `hydra.run.dir`.
A single run refused before it starts (a config error, or a launch guard refusal such as the 1T
run on a laptop) removes the fresh default directory Hydra made for it; a directory named with
`hydra.run.dir` is never removed, and a sweep job keeps its `status.json` for the report.
"""

from __future__ import annotations

import os
from pathlib import Path

from moe_lm.training.run_lock import LOCK_FILE

HYDRA_FILES = ("train.log", "plan.log")  # Hydra's job log, created before the job runs
OWN_FILES = (*HYDRA_FILES, "status.json", LOCK_FILE)  # what a refused run itself wrote
PLANS = "plans"  # config.run_kind's folder


def is_default(hydra_overrides: list[str]) -> bool:
    """Whether the run directory is the default, time-stamped one (never a directory the user
    named with `hydra.run.dir`, which is left as it is)."""
    return not any(o.lstrip("+").startswith("hydra.run.dir=") for o in hydra_overrides)


def is_fresh(run_dir: Path) -> bool:
    """True when the directory holds nothing but what Hydra wrote before the job started."""
    run_dir = Path(run_dir)
    return not run_dir.exists() or all(p.name in HYDRA_FILES for p in run_dir.iterdir())


def discard_fresh_run_dir(run_dir: Path) -> None:
    """Removes a refused run's directory: only its own files, then the directory, then the
    `outputs/<date>/` (and `outputs/`) above it if that left them empty."""
    run_dir = Path(run_dir)
    for name in OWN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    folder = run_dir
    while True:
        try:
            os.rmdir(folder)  # only ever an empty directory
        except OSError:
            return
        folder = folder.parent
        if not {folder.name, folder.parent.name} & {"outputs", PLANS}:
            return
