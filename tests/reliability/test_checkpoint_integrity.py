"""Damaged checkpoints: caught by checksum at resume (older one used) and in tools (error); never
trained over when none is usable; a kill during pruning leaves nothing half-deleted."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from moe_lm.config import ExpertConfig, LossConfig, ModelConfig
from moe_lm.errors import CheckpointError
from moe_lm.inference.evaluate import evaluate_batches
from moe_lm.model import Transformer
from moe_lm.training import checkpoint as ckpt_mod
from tests.conftest import train_losses
from tests.reliability.conftest import flip_bytes, largest_distcp, md5_tree, step_dir
from tests.training.helpers import train_cli, train_in_process


def _flip_distcp(ckpt):
    flip_bytes(largest_distcp(ckpt))


def _garble_metadata(ckpt):
    flip_bytes(ckpt / ".metadata", count=64)


def _wrong_shape_meta(ckpt):
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "files": list(meta["files"])}))


@pytest.mark.parametrize("damage, problem", [
    (_flip_distcp, "does not match the checksum"),
    (_garble_metadata, "does not match the checksum"),
    (_wrong_shape_meta, "wrong shape"),
])
def test_damaged_newest_checkpoint_is_skipped_and_the_resume_matches_an_uninterrupted_run(
        runs, stopped_copy, overrides, damage, problem):
    run = stopped_copy
    damage(step_dir(run, 10))
    damaged = md5_tree(step_dir(run, 10))
    with pytest.warns(UserWarning, match=problem):
        train_in_process(run, overrides)
    full, resumed = train_losses(runs["full"]), train_losses(run)
    assert [resumed[s] for s in range(6, 13)] == [full[s] for s in range(6, 13)]
    # the damaged checkpoint was set aside when step 10 was saved again, not deleted
    assert md5_tree(run / "checkpoints" / "superseded_step_0000010_1") == damaged


def test_bit_flip_makes_eval_fail_with_a_clear_error(stopped_copy):
    _flip_distcp(step_dir(stopped_copy, 10))
    proc = subprocess.run([sys.executable, "-m", "moe_lm.eval", str(stopped_copy), "--batches",
                           "1", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "moe_lm: error:" in out and "checksum" in out and "Traceback" not in out


def test_all_checkpoints_unusable_refuses_to_start_without_touching_a_file(stopped_copy,
                                                                           overrides):
    run = stopped_copy
    victim = largest_distcp(step_dir(run, 10))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated
    (step_dir(run, 5) / "meta.json").unlink()  # its weights intact: recoverable
    before = md5_tree(run, skip=("status.json", ".lock", "train.log"))
    proc = train_cli(run, overrides)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    assert "moe_lm: error:" in out and "Traceback" not in out and "none can be resumed" in out
    assert "step_0000010: file" in out and "truncated" in out
    assert "step_0000005: it has no meta.json" in out and "trainer.resume=never" in out
    assert md5_tree(run, skip=("status.json", ".lock", "train.log")) == before
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and "none can be resumed" in status["error"]


def test_checkpoint_without_checksums_and_garbled_metadata_is_a_clear_error(stopped_copy,
                                                                            overrides):
    """A checkpoint saved before checksums: DCP's BaseException-derived CheckpointException
    becomes one CheckpointError."""
    ckpt = step_dir(stopped_copy, 10)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"] = {n: e["size"] for n, e in meta["files"].items()}  # the old format
    (ckpt / "meta.json").write_text(json.dumps(meta))
    (ckpt / ".metadata").write_bytes(b"\x00" * (ckpt / ".metadata").stat().st_size)
    with pytest.raises(CheckpointError, match="Could not read checkpoint") as info:
        train_in_process(stopped_copy, overrides)
    assert "Traceback" not in str(info.value)


def test_kill_during_pruning_leaves_no_partial_checkpoint(stopped_copy, overrides, monkeypatch):
    run = stopped_copy
    real_rmtree = ckpt_mod.shutil.rmtree

    def killed_midway(path, ignore_errors=False):  # deletes one file, then the process "dies"
        next(p for p in path.iterdir() if p.suffix == ".distcp").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt_mod.remove_checkpoint(step_dir(run, 5))
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", real_rmtree)
    assert not step_dir(run, 5).exists()
    assert (run / "checkpoints" / ".pruning_step_0000005").is_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipping checkpoint" warning at the next start
        train_in_process(run, [*overrides, "trainer.keep_last=1"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000012"]


def test_eval_of_a_model_with_non_finite_loss_is_an_error_not_infinity():
    model = Transformer(ModelConfig(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1,
                                    ffn_hidden=32, vocab_size=64),
                        ExpertConfig(num_experts=2, top_k=1, hidden_size=16), LossConfig())
    model.init_weights()
    batches = [torch.randint(0, 64, (2, 9))]
    assert evaluate_batches(model, batches, np.ones(64, dtype=np.int64)).loss > 0  # finite
    with torch.no_grad():
        model.norm.weight.fill_(float("inf"))  # what a flipped exponent bit does to a weight
    with pytest.raises(CheckpointError, match="non-finite loss"):
        evaluate_batches(model, batches, np.ones(64, dtype=np.int64))
