"""moe_lm.report on hand-made sweep directories: every job listed, whatever state it is in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moe_lm.errors import MoeLMError
from moe_lm.launch.job_status import write_status
from moe_lm.reporting.sweep_report import expected_jobs, write_report
from tests.sweeps.helpers import report_row

BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def make_sweep(root: Path, task: list[str], params: dict | None = None,
               sweeper: str = BASIC) -> Path:
    """A sweep directory with the multirun.yaml Hydra writes (the parts the report reads)."""
    root.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"hydra": {
        "sweeper": {"_target_": sweeper, "max_batch_size": None, "params": params},
        "overrides": {"task": task}}}), root / "multirun.yaml")
    return root


def make_job(sweep: Path, num: int, overrides: list[str], status: str | None,
             val: list[tuple[int, float]] = (), train: list[dict] = (), **fields) -> Path:
    job = sweep / str(num)
    job.mkdir()
    if status is not None:
        write_status(job, status, overrides=overrides, job_num=num, **fields)
    rows = [{"step": s, "val_loss": v, "val_ppl": 1.0} for s, v in val] + list(train)
    if rows:
        (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return job


def train_row(step: int, tok_s: float, imbalance: float, dropped: float) -> dict:
    return {"step": step, "loss": 5.0, "tokens_per_s": tok_s, "moe/load_imbalance": imbalance,
            "moe/dropped_frac": dropped}


def test_report_lists_completed_failed_killed_and_missing_jobs(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", ["trainer.max_steps=20"],
                       params={"expert": "top2,sigmoid,expert_choice,aux_free"})
    common = ["trainer.max_steps=20"]
    make_job(sweep, 0, ["expert=top2", *common], "completed", val=[(0, 11.0), (20, 6.5)],
             train=[train_row(10, 100, 1.5, 0.0), train_row(20, 300, 1.25, 0.0)], step=20)
    make_job(sweep, 1, ["expert=sigmoid", *common], "failed",
             error="ConfigError: expert.router=sigmoid broke")
    killed = make_job(sweep, 2, ["expert=expert_choice", *common], "running",
                      val=[(0, 11.0)], train=[train_row(5, 200, 1.0, 0.125)])
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss"')  # the line it was writing when it died
    text, jobs = write_report(sweep)

    assert [(j.num, j.status) for j in jobs] == [
        (0, "completed"), (1, "failed"), (2, "running"), (3, "missing")]
    assert report_row(text, 0) == ["0", "`expert=top2`", "completed", "20", "6.5000", "200",
                                   "1.250", "0.0000"]
    assert report_row(text, 1)[1:5] == ["`expert=sigmoid`", "failed", "-", "-"]
    assert report_row(text, 2)[1:8] == ["`expert=expert_choice`", "running or killed", "5",
                                        "11.0000", "200", "1.000", "0.1250"]
    assert report_row(text, 3)[1:3] == ["`expert=aux_free`", "missing"]
    assert "Shared overrides: `trainer.max_steps=20`" in text
    assert "- job 1 (`expert=sigmoid`): ConfigError: expert.router=sigmoid broke" in text
    assert "- job 3 (`expert=aux_free`): no job directory" in text
    assert "Lowest final validation loss: job 0 (`expert=top2`), 6.5000." in text
    assert (sweep / "report.png").stat().st_size > 10_000


def test_expected_jobs_follow_hydras_basic_sweeper_order(tmp_path):
    sweep = make_sweep(tmp_path / "s", ["optim.lr=1e-3,3e-3", "seed=1"],
                       params={"expert.num_experts": "4,8"})
    assert expected_jobs(sweep) == [
        ["expert.num_experts=4", "optim.lr=0.001", "seed=1"],  # as the jobs record them
        ["expert.num_experts=4", "optim.lr=0.003", "seed=1"],
        ["expert.num_experts=8", "optim.lr=0.001", "seed=1"],
        ["expert.num_experts=8", "optim.lr=0.003", "seed=1"]]
    other = make_sweep(tmp_path / "o", ["x=1"], sweeper="hydra_plugins.optuna.OptunaSweeper")
    assert expected_jobs(other) is None  # an optimiser picks its jobs as it goes


def test_report_without_multirun_yaml_uses_the_job_dirs(tmp_path):
    sweep = tmp_path / "copied"
    sweep.mkdir()
    make_job(sweep, 0, ["optim.lr=0.001"], "completed", val=[(4, 9.0)], step=4)
    make_job(sweep, 1, [], None, val=[(4, 8.0)])  # no status.json: an older run
    text, jobs = write_report(sweep)
    assert [j.status for j in jobs] == ["completed", "unknown"]
    assert report_row(text, 1)[2:5] == ["no status.json", "4", "8.0000"]


def test_wandb_naming_overrides_do_not_count_as_varying(tmp_path):
    sweep = tmp_path / "s"
    sweep.mkdir()
    for n in (0, 1):
        make_job(sweep, n, [f"optim.lr={n}", f"logger.wandb.name='optim.lr={n}'"], "completed",
                 val=[(1, 1.0)])
    text, _ = write_report(sweep)
    assert report_row(text, 1)[1] == "`optim.lr=1`"


def test_report_cli_errors_clearly_on_a_directory_without_jobs(tmp_path):
    with pytest.raises(MoeLMError, match="holds no sweep jobs"):
        write_report(tmp_path)
    out = subprocess.run([sys.executable, "-m", "moe_lm.report", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "is not a directory" in out.stderr
    assert "Traceback" not in out.stderr


def test_report_has_a_column_per_source_of_a_data_mixture(tmp_path):
    sweep = tmp_path / "mix"
    sweep.mkdir()
    mixed = make_job(sweep, 0, ["data=mix"], "completed", step=8)
    rows = [{"step": s, "val_loss": 0.6 * web + 0.4 * code, "val/web/loss": web,
             "val/code/loss": code, "data/web/epochs": 0.5} for s, web, code in
            [(4, 7.0, 8.0), (8, 5.0, 6.5)]]
    (mixed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_job(sweep, 1, ["data=plain"], "completed", val=[(8, 5.5)], step=8)
    text, jobs = write_report(sweep)
    header = next(line for line in text.splitlines() if line.startswith("| job"))
    assert header.endswith("| dropped frac | val/web/loss | val/code/loss |")
    assert jobs[0].source_losses == {"web": 5.0, "code": 6.5}  # the last evaluation's
    assert report_row(text, 0)[4] == "5.6000" and report_row(text, 0)[8:] == ["5.0000", "6.5000"]
    assert report_row(text, 1)[8:] == ["-", "-"]  # a job without the mixture
    assert "`val/<name>/loss` = the last validation loss on that source" in text
    plain, _ = write_report(make_sweep(tmp_path / "plain", ["x=1"]))
    assert "val/" not in plain
