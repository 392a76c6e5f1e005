"""A full disk during a save: one `moe_lm: error:` paragraph saying so, status.json `failed`, the
partial save removed, the earlier checkpoints intact and resumable."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from moe_lm.training.checkpoint import list_checkpoints, verify_content
from tests.conftest import train_losses
from tests.training.helpers import train_in_process

REPO = Path(__file__).resolve().parents[2]


def _train_with_fault(run: Path, fault: str, overrides: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tests.reliability.faults", fault, f"hydra.run.dir={run}",
           *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def _assert_clean_disk_full_failure(run: Path, proc: subprocess.CompletedProcess) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "moe_lm: error: No space left on device while saving checkpoint step_0000010" in out
    assert "Traceback" not in out
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and "No space left on device" in status["error"]
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000005"]  # no .tmp_step_0000010
    assert verify_content(list_checkpoints(run)[0]) is None


def test_full_disk_during_a_save_fails_cleanly_and_resumes(runs, tmp_path, overrides):
    run = tmp_path / "run"
    proc = _train_with_fault(run, "enospc_on_save=2", overrides)
    _assert_clean_disk_full_failure(run, proc)
    train_in_process(run, overrides)  # space freed: the same command resumes from step 5
    full, resumed = train_losses(runs["full"]), train_losses(run)
    assert [resumed[s] for s in range(6, 13)] == [full[s] for s in range(6, 13)]


@pytest.fixture
def small_tmpfs(tmp_path, runs):
    """A real filesystem that holds one checkpoint and a half (needs permission to mount)."""
    one = sum(p.stat().st_size for p in (runs["full"] / "checkpoints" / "step_0000012").iterdir())
    mount = tmp_path / f"tmpfs_{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    size = int(one * 1.5)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC test covers it")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_really_full_tmpfs_during_a_save_fails_cleanly(small_tmpfs, overrides):
    run = small_tmpfs / "run"
    proc = _train_with_fault(run, "none", overrides)
    _assert_clean_disk_full_failure(run, proc)


def test_base_exception_from_torch_checkpointing_is_one_paragraph_and_status_failed(tmp_path,
                                                                                   overrides):
    run = tmp_path / "run"
    proc = _train_with_fault(run, "checkpoint_exception_in_fit", overrides)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "moe_lm: error: A checkpoint read or write failed (OSError: [Errno 5] Input/output " \
           "error)" in out and "Traceback" not in out
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and "Input/output error" in status["error"]
