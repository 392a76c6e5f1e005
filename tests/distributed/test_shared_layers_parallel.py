"""`model.share_layers` under FSDP2 and expert parallelism: sharding is applied per distinct
block, the block is then applied share_layers times per step, and 2 processes (gloo, CPU) still
train exactly like one process with the same global batch."""

from __future__ import annotations

import pytest

from tests.conftest import train_losses
from tests.distributed.conftest import PER_RANK_BATCH
from tests.distributed.helpers import STEPS, WORLD, assert_losses_close, grad_norms, torchrun_train
from tests.training.helpers import train_in_process

pytestmark = pytest.mark.distributed

SHARED = ["model.n_layers=2", "model.n_dense_layers=0", "model.share_layers=2"]  # 1 MoE block x 2


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parallel.dp_shard=2", "parallel.ep=2"])
def test_shared_layers_under_fsdp_and_ep_equal_one_process(tmp_path, dist_overrides, layout):
    single = tmp_path / "single"
    train_in_process(single, [*dist_overrides, *SHARED, f"data.batch_size={PER_RANK_BATCH * WORLD}"])
    proc = torchrun_train(tmp_path / "two", [*dist_overrides, *SHARED,
                                             f"data.batch_size={PER_RANK_BATCH}", layout])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    want, got = train_losses(single), train_losses(tmp_path / "two")
    print(layout, got, "\nsingle:", want)
    assert_losses_close(got, want, range(1, STEPS + 1))
    assert_losses_close(grad_norms(tmp_path / "two"), grad_norms(single), range(1, STEPS + 1),
                        "grad_norm")
