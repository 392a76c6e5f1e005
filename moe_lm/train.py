"""Entry point: `python -m moe_lm.train [+experiment=NAME] [key=value ...]` (and `-m` for sweeps).

Hydra composes and type-checks the config; `moe_lm.runs.train_job` turns it into dataclasses once,
writes the run directory's `.hydra/` (never over a resumed run's), and hands over to the training
loop (or the dry run).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from moe_lm.config import register_configs
from moe_lm.errors import MoeLMError
from moe_lm.launch import slurm
from moe_lm.runs.train_job import SWEEP_STOPPED_EXIT, in_sweep, train_job
from moe_lm.training.run_lock import check_run_dir_arg

register_configs()


@hydra.main(version_base="1.3", config_path="pkg://moe_lm.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Trains one run; returns the final validation loss (what optimising sweepers minimise).

    Every run records how it ended in `<run>/status.json`. In a sweep (`-m`) a failing job raises
    after recording its error, so Hydra still runs the sweep's other jobs, then exits non-zero.
    """
    try:
        job = train_job(cfg)
    except MoeLMError as err:
        print(f"moe_lm: error: {err}", file=sys.stderr, flush=True)
        if in_sweep():
            raise  # Hydra lists the failed job and runs the rest of the sweep
        sys.exit(2)
    if job.sweep_stop_message:  # SIGTERM ends the whole sweep, not just this job
        print(job.sweep_stop_message, file=sys.stderr, flush=True)
    if job.stopped:  # checkpointed and resumable: a code schedulers tell from "completed"
        sys.exit(SWEEP_STOPPED_EXIT)
    return job.val_loss


if __name__ == "__main__":
    try:
        slurm.check_launcher_plugin(sys.argv[1:])
        check_run_dir_arg(sys.argv[1:])
    except MoeLMError as err:
        print(f"moe_lm: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    main()
