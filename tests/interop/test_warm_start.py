"""`init.from_checkpoint`: continued training from imported weights, on one process and on two."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_lm.inference import load_model
from moe_lm.interop.import_hf import import_hf
from tests.conftest import TINY_OVERRIDES, train_losses
from tests.distributed.helpers import assert_losses_close, torchrun_train
from tests.interop.conftest import hf_config, save_hf_model
from tests.training.helpers import train_cli, train_in_process

STEPS = 3


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """An imported Qwen3-MoE (one dense layer, per-head q/k norm, raw top-k weights)."""
    root = tmp_path_factory.mktemp("warm")
    save_hf_model(root / "hf", hf_config("qwen3_moe"))
    return import_hf(root / "hf", root / "imported")


def _overrides(imported: Path, data_cache, batch: int) -> list[str]:
    # the model keys of TINY_OVERRIDES are replaced by the checkpoint's: they show they are
    return [*TINY_OVERRIDES, f"data.cache_dir={data_cache}", f"init.from_checkpoint={imported}",
            f"trainer.max_steps={STEPS}", f"data.batch_size={batch}", "trainer.eval_every=100",
            "trainer.ckpt_every=100"]


def test_training_starts_from_the_checkpoint_weights_with_a_fresh_optimizer(imported, tmp_path,
                                                                          data_cache):
    run = tmp_path / "run"  # the CLI: it records the model the run trains in .hydra/config.yaml
    proc = train_cli(run, [*_overrides(imported, data_cache, 8), "optim.lr=1e-30"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "starting from the weights of" in out
    before, after = load_model(imported, device="cpu"), load_model(run, device="cpu")
    assert after.cfg.model == before.cfg.model and after.cfg.expert.norm_topk_prob is False
    assert after.tokenizer.name == before.tokenizer.name
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # lr 1e-30: each update rounds away in fp32, the weights stay the imported ones
        assert torch.equal(after.model(ids).logits, before.model(ids).logits)
    assert sorted(train_losses(run)) == list(range(1, STEPS + 1))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parallel.ep=2", "parallel.dp_shard=2"])
def test_warm_start_under_two_ranks_equals_one_process(imported, tmp_path, data_cache, layout):
    single, dist = tmp_path / "single", tmp_path / "dist"
    train_in_process(single, _overrides(imported, data_cache, 8))
    proc = torchrun_train(dist, [*_overrides(imported, data_cache, 4), layout], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_losses_close(train_losses(dist), train_losses(single), range(1, STEPS + 1))
