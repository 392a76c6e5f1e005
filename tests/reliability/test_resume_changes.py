"""Config keys changed on resume: applied for real (lr), refused with the key named (data layout,
seed, routing) unless allowed; trainer.resume=never|must."""

from __future__ import annotations

import json

import pytest

from moe_lm.errors import CheckpointError
from tests.conftest import read_metrics, train_losses
from tests.training.helpers import train_in_process


def _lrs(run):
    return {r["step"]: r["lr"] for r in read_metrics(run) if "lr" in r}


def test_changed_lr_on_resume_takes_effect_as_in_an_uninterrupted_run(runs, stopped_copy,
                                                                      overrides, tmp_path, capsys):
    train_in_process(tmp_path / "full_low_lr", [*overrides, "optim.lr=1e-3"])
    train_in_process(stopped_copy, [*overrides, "optim.lr=1e-3"])
    assert "optim.lr changed from 0.003 to 0.001: applied from step 11" in capsys.readouterr().out
    resumed, reference = _lrs(stopped_copy), _lrs(tmp_path / "full_low_lr")
    assert [resumed[s] for s in range(11, 13)] == [reference[s] for s in range(11, 13)]
    assert resumed[10] == _lrs(runs["full"])[10]  # the steps before the resume kept theirs


@pytest.mark.parametrize("change", ["data.seq_len=16", "trainer.seed=7", "expert.top_k=1"])
def test_changed_data_or_routing_key_on_resume_is_refused_naming_it(stopped_copy, overrides,
                                                                     change):
    key, value = change.split("=")
    before = (stopped_copy / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=f"{key}: checkpoint .*, now {value}") as info:
        train_in_process(stopped_copy, [*overrides, change])
    assert f"trainer.resume_allow_changes=[{key}]" in str(info.value)
    assert (stopped_copy / "metrics.jsonl").read_text() == before


def test_allowed_change_is_accepted_and_said(stopped_copy, overrides, capsys):
    train_in_process(stopped_copy, [*overrides, "trainer.seed=7",
                                    "trainer.resume_allow_changes=[trainer.seed]"])
    assert "trainer.seed changed from 1234 to 7: accepted" in capsys.readouterr().out
    assert max(train_losses(stopped_copy)) == 12


def test_resume_never_moves_the_old_run_aside_and_starts_at_step_0(runs, stopped_copy,
                                                                   overrides):
    old_metrics = (stopped_copy / "metrics.jsonl").read_text()
    train_in_process(stopped_copy, [*overrides, "trainer.resume=never"])
    aside = stopped_copy / "superseded_1"
    assert (aside / "metrics.jsonl").read_text() == old_metrics
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step_0000005",
                                                                         "step_0000010"]
    assert train_losses(stopped_copy) == train_losses(runs["full"])  # a fresh run from step 0


def test_resume_must_refuses_an_empty_run_directory(tmp_path, overrides):
    with pytest.raises(CheckpointError, match="trainer.resume=must"):
        train_in_process(tmp_path / "empty", [*overrides, "trainer.resume=must"])
    assert not (tmp_path / "empty" / "metrics.jsonl").exists()


def test_checkpoint_records_the_config_it_was_trained_with(runs):
    meta = json.loads((runs["stopped"] / "checkpoints" / "step_0000010" / "meta.json").read_text())
    assert meta["config"]["optim"]["lr"] == 3e-3 and meta["config"]["data"]["seq_len"] == 32
    assert all(len(e["xxh3_128"]) == 32 for e in meta["files"].values())
