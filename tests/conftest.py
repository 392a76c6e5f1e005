"""Shared fixtures: a tiny run config on a small slice of the built-in corpus, and markers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# triton.jit picks interpreter-or-GPU when a kernel is defined, i.e. when moe_lm (its ops layer)
# is first imported: set before anything below imports it
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

from tests.training.helpers import train_run  # noqa: E402  (after the wandb settings)

TINY_OVERRIDES = [
    "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
    "model.ffn_hidden=128", "expert.num_experts=4", "expert.hidden_size=64",
    "data.seq_len=32", "data.batch_size=4", "data.corpus_mb=0.3",
    "trainer.precision=fp32", "trainer.log_every=1", "trainer.eval_every=5",
    "trainer.eval_batches=2", "trainer.ckpt_every=5", "optim.warmup_steps=2",
    "logger.wandb.mode=disabled",
]


TRAIN_STEPS = 10  # of `tiny_run`, the run the after-training tools are tested on


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One tokenized-corpus cache for the whole session."""
    return tmp_path_factory.mktemp("moe_lm_cache")


@pytest.fixture
def tiny_overrides(data_cache) -> list[str]:
    return [*TINY_OVERRIDES, f"data.cache_dir={data_cache}"]


@pytest.fixture(scope="session")
def session_overrides(data_cache) -> list[str]:
    """The tiny config for session-scoped runs."""
    return [*TINY_OVERRIDES, f"data.cache_dir={data_cache}"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, session_overrides) -> Path:
    """A run directory holding a tiny model trained for TRAIN_STEPS steps (fp32), trained once
    per session for the tests of inference, compress, interop and objectives."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    train_run(run_dir, [*session_overrides, f"trainer.max_steps={TRAIN_STEPS}"])
    return run_dir


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss; a step logged twice (resumed run) keeps its last row."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
