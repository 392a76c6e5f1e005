"""Local multiruns end to end: each job its own run dir, failures recorded, the report lists all."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_lm.launch.job_status import read_status
from moe_lm.reporting.sweep_report import write_report
from tests.conftest import read_metrics
from tests.sweeps.helpers import multirun_cli, report_row


def final_val_loss(run_dir: Path) -> float:
    return [r for r in read_metrics(run_dir) if "val_loss" in r][-1]["val_loss"]


@pytest.mark.slow
def test_two_job_multirun_report_lists_both_jobs_with_their_numbers(tmp_path, tiny_overrides):
    sweep = tmp_path / "sweep"
    out = multirun_cli(sweep, [*tiny_overrides, "trainer.max_steps=4", "optim.lr=1e-3,3e-3"])
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()  # the sweep says where it writes, first and last
    assert lines[0].startswith(f"sweep dir: {sweep.resolve()}  ")
    assert lines[-1].endswith(f"python -m moe_lm.report {sweep.resolve()})")
    for num, lr in ((0, "0.001"), (1, "0.003")):
        job = sweep / str(num)
        assert (job / "metrics.jsonl").is_file() and (job / "checkpoints").is_dir()
        status = read_status(job)
        assert status["status"] == "completed" and status["job_num"] == num
        assert f"optim.lr={lr}" in status["overrides"] and status["step"] == 4
        assert status["val_loss"] == final_val_loss(job)  # what the task function returned
    text, jobs = write_report(sweep)
    assert (sweep / "report.md").read_text() == text
    assert (sweep / "report.png").stat().st_size > 10_000
    assert [j.status for j in jobs] == ["completed", "completed"]
    for num, lr in ((0, "0.001"), (1, "0.003")):
        cells = report_row(text, num)
        metrics = read_metrics(sweep / str(num))
        assert cells[1] == f"`optim.lr={lr}`" and cells[2] == "completed" and cells[3] == "4"
        assert cells[4] == f"{final_val_loss(sweep / str(num)):.4f}"
        assert float(cells[5].replace(",", "")) > 0  # tokens/s
        assert cells[6] == f"{[r for r in metrics if 'loss' in r][-1]['moe/load_imbalance']:.3f}"
        assert cells[7] == "0.0000"  # dropless
    assert "optim.lr=1e-3,3e-3" not in text and "`trainer.max_steps=4`" in text  # shared


@pytest.mark.slow
def test_failed_job_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_overrides):
    sweep = tmp_path / "sweep"
    out = multirun_cli(sweep, [*tiny_overrides, "trainer.max_steps=2", "expert.top_k=9,1"])
    assert out.returncode != 0  # the sweep says it had a failure...
    assert "moe_lm: error: expert.top_k=9 must be between 1" in out.stderr
    failed, ok = read_status(sweep / "0"), read_status(sweep / "1")
    assert failed["status"] == "failed" and "ConfigError: expert.top_k=9" in failed["error"]
    assert ok["status"] == "completed" and ok["step"] == 2  # ...after running the next job
    text, jobs = write_report(sweep)
    assert report_row(text, 0)[2] == "failed" and report_row(text, 0)[4] == "-"
    assert report_row(text, 1)[2] == "completed"
    assert "- job 0 (`expert.top_k=9`): ConfigError: expert.top_k=9 must be" in text
