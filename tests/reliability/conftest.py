"""One interrupted run (checkpoints at steps 5 and 10 of 12) and its uninterrupted reference,
trained once per module; each test damages its own copy."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY_OVERRIDES
from tests.training.helpers import train_in_process

STEPS = ["trainer.max_steps=12", "trainer.ckpt_every=5", "trainer.keep_last=3",
         "trainer.eval_every=100"]


@pytest.fixture(scope="module")
def overrides(data_cache) -> list[str]:
    return [*TINY_OVERRIDES, f"data.cache_dir={data_cache}", *STEPS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, overrides) -> dict[str, Path]:
    """`stopped`: stopped at step 10 (checkpoints 5 and 10); `full`: the same 12 steps in one go."""
    root = tmp_path_factory.mktemp("reference_runs")
    train_in_process(root / "full", overrides)
    train_in_process(root / "stopped", [*overrides, "trainer.stop_at=10"])
    return {"full": root / "full", "stopped": root / "stopped"}


@pytest.fixture
def stopped_copy(runs, tmp_path) -> Path:
    """A private copy of the run stopped at step 10."""
    return Path(shutil.copytree(runs["stopped"], tmp_path / "run"))


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:07d}"


def largest_distcp(ckpt: Path) -> Path:
    return max((p for p in ckpt.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)


def flip_bytes(path: Path, count: int = 16) -> None:
    """Inverts `count` bytes in the middle of the file (same size: the size check passes)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def md5_tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """`{relative path: md5}` of every file under `root`, except top-level names in `skip`."""
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).parts[0] not in skip}
