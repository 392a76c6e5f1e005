"""Settings that would train wrongly without a word are refused; SIGTERM's status and exit code."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from hydra import compose, initialize_config_module

from moe_lm.config import to_train_config
from moe_lm.errors import ConfigError
from moe_lm.launch.job_status import EXIT_STOPPED
from moe_lm.training.run_lock import check_run_dir_arg
from tests.conftest import read_metrics, train_losses
from tests.training.helpers import train_cli, train_in_process


def _cfg(overrides):
    with initialize_config_module(config_module="moe_lm.conf", version_base="1.3"):
        return to_train_config(compose(config_name="config", overrides=overrides))


@pytest.mark.parametrize("override, says", [
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0 must be > 0"),
    ("optim.grad_clip=0", "optim.grad_clip=null to turn clipping off"),
    ("optim.lr=-1", "optim.lr=-1.0 must be a positive number"),
    ("optim.lr=0", "optim.lr=0.0 must be a positive number"),
    ("optim.warmup_steps=-5", "optim.warmup_steps=-5 must be >= 0"),
    ("model.d_model=0", "model.d_model=0: model sizes must be >= 1"),
    ("expert.hidden_size=0", "expert.hidden_size=0: model sizes must be >= 1"),
    ("trainer.resume=sometimes", "trainer.resume='sometimes'"),
])
def test_setting_that_would_train_wrongly_is_refused(override, says):
    with pytest.raises(ConfigError) as info:
        _cfg([override])
    assert says in str(info.value)


def test_cli_zero_model_size_is_one_paragraph_not_a_traceback(tmp_path, tiny_overrides):
    proc = train_cli(tmp_path / "run", [*tiny_overrides, "model.d_model=0"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "moe_lm: error: model.d_model=0" in out
    assert "Traceback" not in out


def test_grad_clip_null_trains_like_a_clip_that_never_binds(tmp_path, tiny_overrides):
    steps = [*tiny_overrides, "trainer.max_steps=3", "trainer.eval_every=100"]
    train_in_process(tmp_path / "null", [*steps, "optim.grad_clip=null"])
    train_in_process(tmp_path / "huge", [*steps, "optim.grad_clip=1e30"])
    assert train_losses(tmp_path / "null") == train_losses(tmp_path / "huge")


def test_second_real_run_is_refused_and_sigterm_exits_143_with_the_real_step(tmp_path,
                                                                             tiny_overrides):
    run = tmp_path / "run"
    steps = [*tiny_overrides, "trainer.max_steps=200", "trainer.ckpt_every=100",
             "trainer.eval_every=100"]
    proc = train_cli(run, steps)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len(train_losses(run)) >= 3:
            second = train_cli(run, steps)  # the same command again, while the first trains
            second_out, _ = second.communicate(timeout=240)
            assert second.returncode == 2 and "in use by another run" in second_out
            assert f"pid {proc.pid}" in second_out and "Traceback" not in second_out
            assert json.loads((run / "status.json").read_text())["status"] == "running"
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=240)
    assert all(r["step"] == i + 1 for i, r in enumerate(  # the first run's rows alone, in order
        r for r in read_metrics(run) if "loss" in r))
    assert proc.returncode == EXIT_STOPPED == 143, out
    stopped_at = max(r["step"] for r in read_metrics(run))
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "stopped" and status["step"] == stopped_at >= 3
    assert status["val_step"] == 0  # the val_loss recorded is the step-0 eval's, and says so
    assert (run / "checkpoints" / f"step_{stopped_at:07d}").is_dir()


def test_run_dir_that_is_a_file_is_one_paragraph_not_a_hydra_traceback(tmp_path, tiny_overrides):
    (tmp_path / "afile").write_text("not a directory")
    for run in (tmp_path / "afile", tmp_path / "afile" / "run"):
        proc = train_cli(run, [*tiny_overrides, "trainer.max_steps=1"])
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "moe_lm: error: hydra.run.dir=" in out, out
        assert "a run directory must be a writable directory" in out and "Traceback" not in out


def test_read_only_run_dir_is_refused(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("this user (root) may write into read-only directories")
        with pytest.raises(ConfigError, match="read-only"):
            check_run_dir_arg([f"hydra.run.dir={parent / 'run'}"])
    finally:
        parent.chmod(0o755)
