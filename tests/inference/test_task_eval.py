"""lm-eval tasks from the command line (`moe_lm.eval RUN --tasks ...`) and during training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_lm.eval import main as eval_main
from moe_lm.inference import load_model
from moe_lm.inference.task_eval import evaluate_tasks
from moe_lm.inference.cli import run_cli
from moe_lm.reporting.sweep_report import write_report
from tests.conftest import read_metrics
from tests.training.helpers import train_run

pytest.importorskip("lm_eval")

TASK_DIR = Path(__file__).parent / "lm_eval_tasks"
LOCAL = ["--include-path", str(TASK_DIR)]


@pytest.fixture
def offline(monkeypatch):
    """Runs from the task directory (the YAMLs' relative data_files), never on the network."""
    monkeypatch.chdir(TASK_DIR)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_eval_tasks_json_results_and_record(tiny_run, offline, capsys):
    args = [str(tiny_run), "--tasks", "moe_lm_test_mc,moe_lm_test_rolling", "--limit", "3",
            "--batch-size", "2", "--device", "cpu", *LOCAL]
    assert run_cli(eval_main, [*args, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert set(row["results"]) == {"moe_lm_test_mc", "moe_lm_test_rolling"}
    assert set(row["results"]["moe_lm_test_mc"]) == {"acc", "acc_norm"}
    assert 0 <= row["results"]["moe_lm_test_mc"]["acc"] <= 1
    assert row["results"]["moe_lm_test_rolling"]["bits_per_byte"] > 0
    step = load_model(tiny_run, device="cpu").ckpt.step
    record = Path(row["record"])
    assert record == tiny_run / "eval" / f"{step:07d}" / "lm_eval.json"
    assert json.loads(record.read_text())["results"] == row["results"]
    # a second run (table output, int8 experts) is added to the record; the first one stays
    assert run_cli(eval_main, [*args, "--quantize", "int8"]) == 0
    table = capsys.readouterr().out
    assert "moe_lm_test_mc" in table and "acc_norm" in table and "bits_per_byte" in table
    runs = json.loads(record.read_text())["runs"]
    assert [r["quantize"] for r in runs] == ["none", "int8"]
    assert runs[0]["results"] == row["results"]
    int8_bpb = runs[1]["results"]["moe_lm_test_rolling"]["bits_per_byte"]
    fp32_bpb = row["results"]["moe_lm_test_rolling"]["bits_per_byte"]
    assert int8_bpb != fp32_bpb and int8_bpb == pytest.approx(fp32_bpb, rel=0.05)


@pytest.mark.parametrize("dataset, words", [
    ("dataset_path: moe-lm-tests/no-such-dataset", "Couldn't reach"),
    ("dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: missing.jsonl", "missing.jsonl"),
])
def test_a_task_whose_data_cannot_be_loaded_says_how_to_run_offline(tiny_run, offline, tmp_path,
                                                                    capsys, dataset, words):
    (tmp_path / "broken.yaml").write_text(
        f"task: moe_lm_test_broken\n{dataset}\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: 0\n")
    code = run_cli(eval_main, [str(tiny_run), "--tasks", "moe_lm_test_broken", "--device", "cpu",
                               "--include-path", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "moe_lm: error:" in err and words in err
    assert "HF_DATASETS_OFFLINE" in err and "dataset_path: json" in err and "--include-path" in err


def test_an_unknown_task_is_a_clear_error(tiny_run, offline, capsys):
    assert run_cli(eval_main, [str(tiny_run), "--tasks", "no_such_task_xyz", *LOCAL]) == 2
    assert "no_such_task_xyz" in capsys.readouterr().err


def test_training_logs_task_metric_rows_equal_to_evaluating_the_checkpoint(
        tmp_path, tiny_overrides, offline):
    run_dir = tmp_path / "sweep" / "0"  # job 0 of a sweep, for the report below
    train_run(run_dir, [*tiny_overrides, "trainer.max_steps=4", "trainer.eval_every=4",
                               "trainer.ckpt_every=4",
                               "trainer.eval_tasks=[moe_lm_test_mc,moe_lm_test_gen]",
                               "trainer.eval_tasks_limit=3",
                               f"trainer.eval_tasks_include_path={TASK_DIR}"])
    rows = {r["step"]: r for r in read_metrics(run_dir) if "val_loss" in r}
    keys = {"eval/moe_lm_test_mc/acc", "eval/moe_lm_test_mc/acc_norm",
            "eval/moe_lm_test_gen/exact_match"}
    assert set(rows) == {0, 4} and all(keys <= set(r) for r in rows.values())
    assert (run_dir / "eval" / "0000004" / "lm_eval.json").is_file()
    # the same tasks on the step-4 checkpoint, through the command's code path
    loaded = load_model(run_dir, device="cpu")
    row, _ = evaluate_tasks(loaded, "moe_lm_test_mc,moe_lm_test_gen", limit=3,
                            batch_size=loaded.cfg.data.batch_size, include_path=str(TASK_DIR))
    for key in keys:
        _, task, metric = key.split("/")
        assert rows[4][key] == pytest.approx(row["results"][task][metric], abs=1e-6)
    # the sweep report shows each task metric as a column (its last value)
    text, _ = write_report(tmp_path / "sweep")
    header, _, job_row = [line for line in text.splitlines() if line.startswith("|")][:3]
    columns = [c.strip() for c in header.split("|")]
    cells = [c.strip() for c in job_row.split("|")]
    for key in keys:
        assert cells[columns.index(key[len("eval/"):])] == f"{rows[4][key]:.4f}"
