"""Tensor parallelism (`parallel.tp`) trains exactly like one process; bad tp degrees are refused.

The two ranks of a tp=2 group read the same batch, so each uses the single process's
data.batch_size. Shared experts are on, so the attention, the dense layer, the MoE layer's shared
experts (colwise/rowwise) and the sequence-parallel norms all run split; losses and gradient norms
agree to fp32 rounding (relative 1e-5) over STEPS steps.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from moe_lm.config import ParallelConfig
from moe_lm.errors import ConfigError
from moe_lm.parallel.tensor_parallel import check_tensor_parallel
from tests.conftest import train_losses
from tests.distributed.conftest import PER_RANK_BATCH
from tests.distributed.helpers import STEPS, WORLD, assert_losses_close, grad_norms, torchrun_train
from tests.distributed.test_layout_errors import no_model_allocation  # noqa: F401 (fixture)
from tests.distributed.workers import tiny_config
from tests.training.helpers import train_in_process

pytestmark = pytest.mark.distributed


def test_tensor_parallel_2_equals_single_process(tmp_path, dist_overrides):
    overrides = [*dist_overrides, f"data.batch_size={PER_RANK_BATCH * WORLD}",
                 "expert.num_shared=1"]
    single = tmp_path / "single"
    train_in_process(single, overrides)
    proc = torchrun_train(tmp_path / "tp2", [*overrides, "parallel.tp=2"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got, want = train_losses(tmp_path / "tp2"), train_losses(single)
    print("tp=2:", got, "\nsingle:", want)
    assert_losses_close(got, want, range(1, STEPS + 1))
    assert_losses_close(grad_norms(tmp_path / "tp2"), grad_norms(single), range(1, STEPS + 1),
                        "grad_norm")


@pytest.mark.parametrize("tp, change, match", [
    (3, {}, r"parallel.tp=3 must divide model.n_heads=4"),
    (2, {"n_kv_heads": 1}, r"must divide model.n_kv_heads=1"),
    (2, {"ffn_hidden": 49}, r"must divide model.ffn_hidden=49"),
])
def test_tp_not_dividing_heads_or_hidden_is_refused(tp, change, match):
    cfg = tiny_config(ParallelConfig(tp=tp))
    cfg = replace(cfg, model=replace(cfg.model, **change))
    with pytest.raises(ConfigError, match=match):
        check_tensor_parallel(cfg)


def test_tp_not_dividing_the_sequence_fails_before_the_model(tmp_path, tiny_overrides,
                                                             no_model_allocation):  # noqa: F811
    with pytest.raises(ConfigError, match=r"parallel.tp=2 must divide data.seq_len"):
        train_in_process(tmp_path, [*tiny_overrides, "data.seq_len=31", "parallel.tp=2"])


@pytest.mark.slow
def test_checkpoints_reshard_between_tp_2_and_one_process(tmp_path, dist_overrides):
    """Saved with tp=2, resumed by one process, and the other way round: the DCP checkpoint
    holds the full tensors under the same names, so steps 4-5 equal the uninterrupted run."""
    overrides = [*dist_overrides, f"data.batch_size={PER_RANK_BATCH * WORLD}",
                 "expert.num_shared=1"]
    single = tmp_path / "single"
    train_in_process(single, overrides)
    want = train_losses(single)
    proc = torchrun_train(tmp_path / "a", [*overrides, "parallel.tp=2", "trainer.stop_at=3"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train_in_process(tmp_path / "a", overrides)
    train_in_process(tmp_path / "b", [*overrides, "trainer.stop_at=3"])
    proc = torchrun_train(tmp_path / "b", [*overrides, "parallel.tp=2"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    for run in ("a", "b"):
        got = train_losses(tmp_path / run)
        print(run, got, "\nsingle:", want)
        assert_losses_close(got, want, range(1, STEPS + 1))
