"""Failure behaviour with 2 ranks: NaN on one rank, SIGTERM on one rank, a hung collective."""

from __future__ import annotations

import pytest

from moe_lm.training.checkpoint import list_checkpoints
from tests.conftest import read_metrics
from tests.distributed.conftest import PER_RANK_BATCH
from tests.distributed.helpers import assert_stopped_before_step, spawn_ranks
from tests.distributed.workers import train_rank

pytestmark = pytest.mark.distributed


def test_nan_on_one_rank_stops_both_before_the_step(tmp_path, dist_overrides):
    run = tmp_path / "run"
    ranks = spawn_ranks(train_rank, (str(run), [*dist_overrides, f"data.batch_size={PER_RANK_BATCH}",
                                                 "parallel.dp_shard=2"], "nan", 3), tmp_path / "out")
    assert_stopped_before_step(ranks, run, 3)


@pytest.mark.slow
def test_sigterm_on_one_rank_checkpoints_once_and_exits(tmp_path, dist_overrides):
    run = tmp_path / "run"
    ranks = spawn_ranks(train_rank, (str(run), [*dist_overrides, f"data.batch_size={PER_RANK_BATCH}",
                                                 "parallel.ep=2"], "sigterm", 2), tmp_path / "out")
    assert all(r["ok"] for r in ranks), ranks
    ckpts = list_checkpoints(run)
    assert [c.step for c in ckpts] == [2] and ckpts[0].meta["world_size"] == 2
    assert max(row["step"] for row in read_metrics(run)) == 2


@pytest.mark.slow
def test_hung_collective_times_out_with_a_clear_error(tmp_path, dist_overrides):
    run = tmp_path / "run"
    ranks = spawn_ranks(train_rank, (str(run), [*dist_overrides, f"data.batch_size={PER_RANK_BATCH}",
                                                 "parallel.dp_shard=2",
                                                 "trainer.collective_timeout_s=4"],
                                     "stall", 2, 12.0), tmp_path / "out")
    rank0 = ranks[0]
    assert not rank0["ok"] and rank0["type"] == "TrainingError", rank0
    assert "trainer.collective_timeout_s=4" in rank0["message"]
    assert not ranks[1]["ok"]  # the stalled rank finds its peer gone
