"""End-to-end training runs on CPU: loss falls, resume is exact, checkpoints are safe."""

from __future__ import annotations

import json
import shutil
import signal
import time

import pytest

from moe_lm.errors import CheckpointError
from tests.conftest import read_metrics, train_losses
from tests.training.helpers import train_cli, train_in_process


def test_short_run_lowers_validation_loss_and_writes_contract_files(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    train_in_process(run, [*tiny_overrides, "trainer.max_steps=30", "optim.lr=3e-3",
                           "trainer.eval_every=30"])
    rows = read_metrics(run)
    evals = [r for r in rows if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[-1]["val_loss"] < 0.8 * evals[0]["val_loss"]
    train = [r for r in rows if "loss" in r]
    for key in ("step", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens",
                "tokens_per_s", "moe/load_imbalance", "moe/dropped_frac", "moe/router_entropy",
                "moe/layer0/tokens_per_expert"):
        assert key in train[-1], key
    assert len(train[-1]["moe/layer0/tokens_per_expert"]) == 4
    assert (run / "checkpoints" / "step_0000030" / "meta.json").is_file()


def test_resume_after_stop_at_repeats_the_uninterrupted_losses(tmp_path, tiny_overrides):
    steps = [*tiny_overrides, "trainer.max_steps=20"]
    train_in_process(tmp_path / "full", steps)
    train_in_process(tmp_path / "split", [*steps, "trainer.stop_at=10"])
    assert max(train_losses(tmp_path / "split")) == 10
    train_in_process(tmp_path / "split", steps)
    full, split = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert [split[s] for s in range(11, 21)] == [full[s] for s in range(11, 21)]


@pytest.mark.slow
def test_resume_after_sigterm_repeats_the_uninterrupted_losses(tmp_path, tiny_overrides):
    steps = [*tiny_overrides, "trainer.max_steps=40", "trainer.ckpt_every=100"]
    train_in_process(tmp_path / "full", steps)
    run = tmp_path / "killed"
    proc = train_cli(run, steps)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len(train_losses(run)) >= 5:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 143, out  # stopped, resumable (job_status.EXIT_STOPPED)
    stopped_at = max(train_losses(run))
    assert stopped_at < 40 and "SIGTERM" in out
    assert (run / "checkpoints" / f"step_{stopped_at:07d}").is_dir()
    train_in_process(run, steps)
    full, resumed = train_losses(tmp_path / "full"), train_losses(run)
    assert [resumed[s] for s in range(stopped_at + 1, 41)] == [full[s] for s in range(stopped_at + 1, 41)]


def test_truncated_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    steps = [*tiny_overrides, "trainer.max_steps=10", "trainer.ckpt_every=5", "trainer.keep_last=3"]
    train_in_process(run, steps)
    newest = run / "checkpoints" / "step_0000010"
    victim = max((p for p in newest.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.warns(UserWarning, match="truncated"):
        train_in_process(run, [*steps, "trainer.max_steps=12"])
    losses = train_losses(run)
    assert 6 in losses and 12 in losses


def test_checkpoint_of_another_model_shape_is_refused_without_touching_the_run(tmp_path,
                                                                                tiny_overrides):
    run = tmp_path / "run"
    train_in_process(run, [*tiny_overrides, "trainer.max_steps=5"])
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match="d_model"):
        train_in_process(run, [*tiny_overrides, "trainer.max_steps=5", "model.d_model=96",
                               "model.n_heads=4"])
    assert (run / "metrics.jsonl").read_text() == before


def test_cli_reports_bad_key_and_bad_value_in_one_paragraph(tmp_path, tiny_overrides):
    proc = train_cli(tmp_path / "a", ["model.d_modle=3"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "d_modle" in out and "Traceback" not in out
    proc = train_cli(tmp_path / "b", [*tiny_overrides, "expert.top_k=5"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "expert.top_k" in out and "Traceback" not in out


def test_cli_missing_data_path_is_a_clear_error(tmp_path, tiny_overrides):
    proc = train_cli(tmp_path / "a", [*tiny_overrides, f"data.path={tmp_path / 'nope'}"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "data.path" in out and "Traceback" not in out
