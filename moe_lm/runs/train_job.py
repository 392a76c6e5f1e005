"""One training job, as Hydra runs it: from the composed config to a finished (or failed) run.

`train_job(cfg)` is the body of `python -m moe_lm.train`: it holds the run directory's lock (a
second run there is refused), records how the job ended in `<run>/status.json` (BaseExceptions
included), names sweep jobs for wandb, hands SLURM sweep jobs to torchrun, refuses what
this hardware cannot hold before anything is allocated, writes the run directory's `.hydra/`
(never over a resumed run's), and then runs `trainer.dry_run` (planning) or the training loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from moe_lm.config import TrainConfig, to_train_config
from moe_lm.inference.task_eval import TrainingTaskEval
from moe_lm.launch import job_status, slurm
from moe_lm.planning.dry_run import run_dry_run
from moe_lm.planning.guard import Hardware, check_launch
from moe_lm.errors import MoeLMError, RunLockedError
from moe_lm.runs import run_dir as run_dir_tools
from moe_lm.training import distributed as dist_utils
from moe_lm.training.checkpoint import as_user_error
from moe_lm.training.loop import run_training
from moe_lm.training.run_lock import hold_run_lock
from moe_lm.training.warm_start import warm_start_config

SWEEP_STOPPED_EXIT = job_status.EXIT_STOPPED  # 143: a SIGTERM'd job (a sweep's ends the sweep)


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


def run(cfg: TrainConfig, run_dir: Path, dcfg: DictConfig | None = None) -> dict[str, Any]:
    """`trainer.dry_run=true`: one forward and backward on the meta device; else the training run
    (with the lm-eval tasks of `trainer.eval_tasks` at each evaluation).

    With `dcfg` (the composed config) the run's `.hydra/` is written, once the resume is decided:
    a refused resume records nothing."""
    record = None if dcfg is None else (lambda: write_run_config(run_dir, dcfg))
    if cfg.trainer.dry_run:  # shapes only, on the meta device: nothing is allocated
        if record is not None:
            record()
        return run_dry_run(cfg, run_dir)
    task_eval = TrainingTaskEval(cfg, run_dir) if cfg.trainer.eval_tasks else None
    return run_training(cfg, run_dir, task_eval, on_start=record)


def in_sweep() -> bool:
    """Whether the Hydra job running now is one job of a multirun (`-m`)."""
    return HydraConfig.get().mode == RunMode.MULTIRUN


@dataclass
class JobResult:
    """How a training job ended: the run's last evaluation, and whether a sweep must stop."""

    result: dict[str, Any]
    sweep_stop_message: str | None = None  # set when SIGTERM stopped a sweep job early
    stopped: bool = False  # SIGTERM: checkpointed and resumable (exit code EXIT_STOPPED)

    @property
    def val_loss(self) -> float | None:
        return self.result.get("val_loss")


def train_job(cfg: DictConfig) -> JobResult:
    """Trains one run of the Hydra job now running; records how it ended in `<run>/status.json`.

    Any error is recorded in the status file, then raised again for the entry point to report.
    """
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sweep = in_sweep()
    first = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"
    if sweep:
        name_sweep_job(cfg)
    fresh = (first and not sweep and run_dir_tools.is_default(list(hc.overrides.hydra))
             and run_dir_tools.is_fresh(run_dir))
    started = False  # until then a refused single run leaves no directory behind
    try:
        if sweep and slurm.needs_torchrun(os.environ, hc.launcher.get("_target_")):
            if first:  # (the torchrun workers' rank 0 takes the run lock)
                job_status.start_job(run_dir, list(hc.overrides.task), hc.job.num)
            to_train_config(cfg)
            return JobResult({"val_loss": slurm.run_job_under_torchrun(
                str(run_dir), torchrun_args(cfg), os.environ, hc.launcher.get("gpus_per_node"))})
        with hold_run_lock(run_dir, enabled=first):  # refuses a second run in this directory
            if first:
                job_status.start_job(run_dir, list(hc.overrides.task), hc.job.num if sweep else None)
            train_cfg = warm_start_config(to_train_config(cfg))  # init.from_checkpoint: its model
            if train_cfg.init.from_checkpoint:  # .hydra/ records the model the run really trains
                cfg = OmegaConf.merge(cfg, {k: OmegaConf.to_container(OmegaConf.structured(
                    getattr(train_cfg, k))) for k in ("model", "expert", "data")})
            if not train_cfg.trainer.dry_run:  # refuse what this hardware cannot hold, unallocated
                check_launch(train_cfg, list(hc.overrides.task),
                             Hardware.detect(train_cfg.trainer.device))
            started = True
            result = run(train_cfg, run_dir, cfg)
    except BaseException as caught:  # torch's CheckpointException is a BaseException
        err = as_user_error(caught)
        if (fresh and not started and isinstance(err, MoeLMError)
                and not isinstance(err, RunLockedError)):
            run_dir_tools.discard_fresh_run_dir(run_dir)
        elif first and not isinstance(err, (RunLockedError, SystemExit)):
            job_status.fail_job(run_dir, err)  # (a refused second run leaves the holder's file)
        if err is caught:
            raise
        raise err from caught
    t = train_cfg.trainer
    stopped = not t.dry_run and int(result.get("step", 0)) < (t.stop_at or t.max_steps)
    if first:
        job_status.finish_job(run_dir, result, t.stop_at or t.max_steps)
    message = None
    if sweep and stopped:
        message = (f"moe_lm: SIGTERM: the sweep stops at job {hc.job.num}; run the same command "
                   f"with hydra.sweep.dir={hc.sweep.dir} to resume its jobs.")
    return JobResult(result, message, stopped)
