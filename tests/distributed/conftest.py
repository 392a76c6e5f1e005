"""Fixtures of the distributed tests: one single-process reference run shared by the module."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TINY_OVERRIDES, train_losses
from tests.distributed.helpers import STEPS, WORLD
from tests.training.helpers import train_in_process

PER_RANK_BATCH = 4  # each of the WORLD ranks; the single process reads WORLD x that


@pytest.fixture(scope="session")
def dist_overrides(data_cache) -> list[str]:
    """The tiny run, STEPS steps, checkpoint at the end; the batch size is added per layout."""
    return [*TINY_OVERRIDES, f"data.cache_dir={data_cache}", f"trainer.max_steps={STEPS}"]


@pytest.fixture(scope="session")
def single_process_run(dist_overrides, tmp_path_factory) -> Path:
    """The run directory of the single-process run with the same global batch."""
    run = tmp_path_factory.mktemp("single")
    train_in_process(run, [*dist_overrides, f"data.batch_size={PER_RANK_BATCH * WORLD}"])
    return run


@pytest.fixture(scope="session")
def single_process_losses(single_process_run) -> dict[int, float]:
    """step -> loss of the single-process reference run."""
    return train_losses(single_process_run)
