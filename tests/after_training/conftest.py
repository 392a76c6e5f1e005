"""A tiny trained run shared by the after-training tests (trained once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from tests.conftest import TINY_OVERRIDES
from tests.training.helpers import train_in_process

TRAIN_STEPS = 10


def train_run(run_dir: Path, overrides: list[str]) -> dict:
    """Trains like `python -m moe_lm.train` does, writing `.hydra/config.yaml` as it would."""
    with initialize_config_module(config_module="moe_lm.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml", resolve=True)
    return train_in_process(run_dir, overrides)


@pytest.fixture(scope="session")
def session_overrides(data_cache) -> list[str]:
    """The tiny config (tests/conftest.py) for session-scoped runs."""
    return [*TINY_OVERRIDES, f"data.cache_dir={data_cache}"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, session_overrides) -> Path:
    """A run directory holding a tiny model trained for TRAIN_STEPS steps (fp32)."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    train_run(run_dir, [*session_overrides, f"trainer.max_steps={TRAIN_STEPS}"])
    return run_dir
