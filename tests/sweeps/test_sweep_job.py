"""The sweep job itself (moe_lm.train's task function, in-process): what it returns, how it names
itself for wandb, and what it records when it fails."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from moe_lm import train
from moe_lm.errors import ConfigError
from moe_lm.launch.job_status import read_status, wandb_group, wandb_job_name
from tests.conftest import read_metrics


@pytest.fixture(autouse=True)
def _forget_hydra_config():
    """HydraConfig is a process-wide singleton: leave it as found."""
    yield
    HydraConfig.instance().cfg = None


def sweep_job_config(sweep_dir: Path, job_num: int, overrides: list[str]) -> DictConfig:
    """The config Hydra hands job `job_num` of a multirun (as its launcher would set it up)."""
    with initialize_config_module(config_module="moe_lm.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(sweep_dir)
        cfg.hydra.job.num = job_num
        cfg.hydra.job.id = str(job_num)
        cfg.hydra.runtime.output_dir = str(sweep_dir / str(job_num))
    HydraConfig.instance().set_config(cfg)
    return cfg


class FakeWandbRun:
    def log(self, *args, **kwargs): ...
    def finish(self): ...


def test_sweep_job_returns_its_final_val_loss_and_names_itself_for_wandb(
        tmp_path, tiny_overrides, monkeypatch):
    import wandb

    inits = []
    monkeypatch.setattr(wandb, "init", lambda **kw: inits.append(kw) or FakeWandbRun())
    sweep = tmp_path / "multirun" / "sweep_router"
    overrides = [*tiny_overrides, "logger.wandb.mode=offline", "trainer.max_steps=2",
                 "optim.lr=0.001"]
    cfg = sweep_job_config(sweep, 3, overrides)
    val_loss = train.main(cfg)
    job = sweep / "3"
    assert val_loss == [r for r in read_metrics(job) if "val_loss" in r][-1]["val_loss"]
    assert read_status(job)["status"] == "completed" and read_status(job)["job_num"] == 3
    assert len(inits) == 1
    assert inits[0]["group"] == "multirun/sweep_router"  # one group per sweep directory
    assert inits[0]["name"] == cfg.hydra.job.override_dirname  # the job's overrides
    assert "optim.lr=0.001" in inits[0]["name"] and "trainer.max_steps=2" in inits[0]["name"]


def test_sweep_job_keeps_a_user_chosen_wandb_group_and_name(tmp_path, tiny_overrides):
    cfg = sweep_job_config(tmp_path, 0, [*tiny_overrides, "logger.wandb.group=mine",
                                         "logger.wandb.name=run1", "expert.top_k=9"])
    with pytest.raises(ConfigError):
        train.main(cfg)
    assert (cfg.logger.wandb.group, cfg.logger.wandb.name) == ("mine", "run1")


def test_failing_sweep_job_records_its_error_and_raises_for_hydra(tmp_path, tiny_overrides):
    cfg = sweep_job_config(tmp_path, 1, [*tiny_overrides, "expert.top_k=9"])
    with pytest.raises(ConfigError, match="expert.top_k=9"):  # Hydra marks the job failed
        train.main(cfg)
    status = read_status(tmp_path / "1")
    assert status["status"] == "failed" and status["job_num"] == 1
    assert status["error"].startswith("ConfigError: expert.top_k=9 must be between 1")
    assert "expert.top_k=9" in status["overrides"]


def test_wandb_group_and_job_name_from_hydra_runtime_values():
    assert wandb_group("multirun/sweep_router/2025-01-31_12-00-00") == \
        "sweep_router/2025-01-31_12-00-00"
    assert wandb_group("/" + "x" * 300).startswith("x") and len(wandb_group("/" + "x" * 300)) == 128
    assert wandb_job_name("expert=top2,optim.lr=0.001", 4) == "expert=top2,optim.lr=0.001"
    assert wandb_job_name("", 4) == "job4"
