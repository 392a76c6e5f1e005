"""A data mixture over 2 processes (gloo, CPU, FSDP) reads the global batches of one process with
the doubled batch size: the same losses step by step, the same per-source rows and epochs."""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics, train_losses
from tests.data.test_mixture_run import WEIGHTS, mixture_overrides
from tests.distributed.helpers import assert_losses_close, torchrun_train
from tests.training.helpers import train_in_process

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
STEPS = 4


def test_two_process_mixture_run_reads_the_one_process_global_batches(tmp_path):
    _, base = mixture_overrides(tmp_path)
    steps = [*base, f"trainer.max_steps={STEPS}", f"trainer.eval_every={STEPS}"]
    train_in_process(tmp_path / "one", [*steps, "data.batch_size=8"])
    proc = torchrun_train(tmp_path / "two", [*steps, "data.batch_size=4", "parallel.dp_shard=2"],
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert_losses_close(two, one, range(1, STEPS + 1))
    last = {run: [r for r in read_metrics(tmp_path / run) if "val_loss" in r][-1]
            for run in ("one", "two")}
    for name in WEIGHTS:  # every source's sequences counted over both ranks
        assert last["two"][f"data/{name}/epochs"] == last["one"][f"data/{name}/epochs"] > 0
        assert last["two"][f"val/{name}/loss"] == pytest.approx(last["one"][f"val/{name}/loss"],
                                                                rel=1e-5)
