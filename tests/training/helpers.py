"""Running the real entry point in tests: in-process through Hydra's compose API, or as a CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from moe_lm.config import register_configs, to_train_config
from moe_lm.runs.train_job import run

register_configs()


def train_in_process(run_dir: Path, overrides: list[str]) -> dict:
    """Composes the config like `python -m moe_lm.train` would and trains into `run_dir`."""
    with initialize_config_module(config_module="moe_lm.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return run(to_train_config(cfg), Path(run_dir))


def train_run(run_dir: Path, overrides: list[str]) -> dict:
    """Trains like `python -m moe_lm.train` does, writing `.hydra/config.yaml` as it would."""
    with initialize_config_module(config_module="moe_lm.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml", resolve=True)
    return train_in_process(run_dir, overrides)


def train_cli(run_dir: Path, overrides: list[str], **popen_kw) -> subprocess.Popen:
    """Starts `python -m moe_lm.train` writing into `run_dir`."""
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    cmd = [sys.executable, "-m", "moe_lm.train", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen_kw)
