"""2 processes (gloo, CPU) train exactly like one process with the same global batch.

The 2-rank runs use data.batch_size=4 per rank, the single process 8: the loader deals the same
windows, the balance loss sees the global batch, gradients are averaged, so the losses agree to
fp32 rounding (relative 1e-5) over STEPS steps.
"""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics, train_losses
from tests.distributed.conftest import PER_RANK_BATCH
from tests.distributed.helpers import (
    STEPS,
    WORLD,
    assert_losses_close,
    grad_norms,
    torchrun_train,
)
from tests.training.helpers import train_in_process

pytestmark = pytest.mark.distributed

BATCH = f"data.batch_size={PER_RANK_BATCH}"


def _train_2(run, overrides):
    proc = torchrun_train(run, overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_expert_parallel_2_equals_single_process(tmp_path, dist_overrides, single_process_run,
                                                 single_process_losses):
    _train_2(tmp_path, [*dist_overrides, BATCH, "parallel.ep=2"])
    got = train_losses(tmp_path)
    print("ep=2:", got, "\nsingle:", single_process_losses)
    assert_losses_close(got, single_process_losses, range(1, STEPS + 1))
    assert_losses_close(grad_norms(tmp_path), grad_norms(single_process_run),
                        range(1, STEPS + 1), "grad_norm")
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    # rank 0 alone writes: one row per step, and the token count covers both ranks
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["tokens"] == STEPS * PER_RANK_BATCH * WORLD * 32


def test_fsdp_2_equals_single_process(tmp_path, dist_overrides, single_process_run,
                                      single_process_losses):
    _train_2(tmp_path, [*dist_overrides, BATCH, "parallel.dp_shard=2"])
    got = train_losses(tmp_path)
    print("dp_shard=2:", got, "\nsingle:", single_process_losses)
    assert_losses_close(got, single_process_losses, range(1, STEPS + 1))
    assert_losses_close(grad_norms(tmp_path), grad_norms(single_process_run),
                        range(1, STEPS + 1), "grad_norm")


@pytest.mark.slow
def test_checkpoint_from_2_ranks_resumes_on_1(tmp_path, dist_overrides, single_process_losses):
    """Saved with EP=2 over 2 processes, resumed by one process: model, optimizer state and data
    position reshard, and steps 4-5 are those of the uninterrupted single-process run. (Full
    activation checkpointing on the way: it changes memory, never the numbers.)"""
    _train_2(tmp_path, [*dist_overrides, BATCH, "parallel.ep=2", "trainer.stop_at=3",
                        "trainer.activation_checkpointing=full"])
    assert (tmp_path / "checkpoints" / "step_0000003").is_dir()
    train_in_process(tmp_path, [*dist_overrides, f"data.batch_size={PER_RANK_BATCH * WORLD}"])
    got = train_losses(tmp_path)
    print("2 -> 1:", got, "\nsingle:", single_process_losses)
    assert_losses_close(got, single_process_losses, range(1, STEPS + 1))


@pytest.mark.slow
def test_checkpoint_from_1_rank_resumes_on_2(tmp_path, dist_overrides, single_process_losses):
    """Saved by one process, resumed with FSDP over 2 processes (selective checkpointing on)."""
    train_in_process(tmp_path, [*dist_overrides, f"data.batch_size={PER_RANK_BATCH * WORLD}",
                                "trainer.stop_at=3"])
    proc = _train_2(tmp_path, [*dist_overrides, BATCH, "parallel.dp_shard=2",
                               "trainer.activation_checkpointing=selective"])
    assert "resumed from" in proc.stdout + proc.stderr
    got = train_losses(tmp_path)
    print("1 -> 2:", got, "\nsingle:", single_process_losses)
    assert_losses_close(got, single_process_losses, range(1, STEPS + 1))
