"""Entry point: `python -m moe_lm.train [+experiment=NAME] [key=value ...]` (and `-m` for sweeps).

Hydra composes and type-checks the config; this module turns it into dataclasses once, writes the
run directory's `.hydra/` (never over a resumed run's), and hands over to the training loop.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from moe_lm.config import register_configs, to_train_config
from moe_lm.errors import MoeLMError, RunLockedError
from moe_lm.launch import job_status, slurm
from moe_lm.training import distributed as dist_utils
from moe_lm.training.checkpoint import as_user_error
from moe_lm.training.run_lock import check_run_dir_arg, hold_run_lock

register_configs()


def write_run_config(run_dir: Path, cfg: DictConfig) -> None:
    """Saves the composed config and overrides to `<run>/.hydra/`; a resumed run keeps its first."""
    if not dist_utils.is_rank0():
        return
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    overrides = list(HydraConfig.get().overrides.task)
    job_cfg = OmegaConf.create({k: v for k, v in cfg.items() if k != "hydra"})
    if (hydra_dir / "config.yaml").exists():
        n = len(list(hydra_dir.glob("resume_*"))) + 1
        hydra_dir = hydra_dir / f"resume_{n}"
        hydra_dir.mkdir()
    OmegaConf.save(job_cfg, hydra_dir / "config.yaml", resolve=True)
    OmegaConf.save(OmegaConf.create(overrides), hydra_dir / "overrides.yaml")


def name_sweep_job(cfg: DictConfig) -> None:
    """Names a sweep job for wandb: group = its sweep, name = its overrides (unless set)."""
    hc = HydraConfig.get()
    if cfg.logger.wandb.group is None:
        cfg.logger.wandb.group = job_status.wandb_group(hc.sweep.dir)
    if cfg.logger.wandb.name is None:
        cfg.logger.wandb.name = job_status.wandb_job_name(hc.job.override_dirname, hc.job.num)


def torchrun_args(cfg: DictConfig) -> list[str]:
    """The overrides a SLURM job's torchrun workers get: the job's own plus its wandb identity."""
    named = ("logger.wandb.group=", "logger.wandb.name=")
    task = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith(named)]
    w = cfg.logger.wandb
    return task + [f"logger.wandb.{k}={slurm.hydra_string(v)}"
                   for k, v in (("group", w.group), ("name", w.name)) if v is not None]


@hydra.main(version_base="1.3", config_path="pkg://moe_lm.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Trains one run; returns the final validation loss (what optimising sweepers minimise).

    Every run records how it ended in `<run>/status.json`. In a sweep (`-m`) a failing job raises
    after recording its error, so Hydra still runs the sweep's other jobs, then exits non-zero.
    """
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sweep = hc.mode == RunMode.MULTIRUN
    first = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"
    if sweep:
        name_sweep_job(cfg)
    try:
        if sweep and slurm.needs_torchrun(os.environ, hc.launcher.get("_target_")):
            if first:  # (the torchrun workers' rank 0 takes the run lock)
                job_status.start_job(run_dir, list(hc.overrides.task), hc.job.num)
            to_train_config(cfg)
            return slurm.run_job_under_torchrun(str(run_dir), torchrun_args(cfg), os.environ,
                                                hc.launcher.get("gpus_per_node"))
        with hold_run_lock(run_dir, enabled=first):  # refuses a second run in this directory
            if first:
                job_status.start_job(run_dir, list(hc.overrides.task), hc.job.num if sweep else None)
            train_cfg = to_train_config(cfg)
            result = _train(train_cfg, run_dir, cfg, list(hc.overrides.task))
    except BaseException as caught:  # torch's CheckpointException is a BaseException
        err = as_user_error(caught)
        if first and not isinstance(err, (RunLockedError, SystemExit)):
            job_status.fail_job(run_dir, err)  # (a refused second run leaves the holder's file)
        if not isinstance(err, MoeLMError):
            raise
        print(f"moe_lm: error: {err}", file=sys.stderr, flush=True)
        if sweep:
            raise  # Hydra lists the failed job and runs the rest of the sweep
        sys.exit(2)
    t = train_cfg.trainer
    stopped = int(result.get("step", 0)) < (t.stop_at or t.max_steps)
    if first:
        job_status.finish_job(run_dir, result, t.stop_at or t.max_steps)
    if stopped:  # SIGTERM: checkpointed and resumable; a distinct exit code for schedulers
        if sweep:
            print(f"moe_lm: SIGTERM: the sweep stops at job {hc.job.num}; run the same command "
                  f"with hydra.sweep.dir={hc.sweep.dir} to resume its jobs.", file=sys.stderr,
                  flush=True)
        sys.exit(job_status.EXIT_STOPPED)
    return result.get("val_loss")


def _train(train_cfg, run_dir: Path, cfg: DictConfig, overrides: list[str]) -> dict:
    """The guard against what this hardware cannot hold, then the run (config recorded once the
    resume is decided)."""
    if not train_cfg.trainer.dry_run:  # refuse what this hardware cannot hold, unallocated
        from moe_lm.planning.guard import Hardware, check_launch

        check_launch(train_cfg, overrides, Hardware.detect(train_cfg.trainer.device))
    from moe_lm.training.loop import run_training  # after Hydra has parsed the command line

    return run_training(train_cfg, run_dir, on_start=lambda: write_run_config(run_dir, cfg))

if __name__ == "__main__":
    try:
        slurm.check_launcher_plugin(sys.argv[1:])
        check_run_dir_arg(sys.argv[1:])
    except MoeLMError as err:
        print(f"moe_lm: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    main()
