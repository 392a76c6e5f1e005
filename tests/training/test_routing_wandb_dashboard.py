"""What wandb sees of the routing: the offline run file written by training holds the `moe/`
metrics and the expert-load heatmap, and the dashboard-as-code builds, validates offline against
that run's metrics, and refuses panels on keys the run never logs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from moe_lm import dashboard
from moe_lm.errors import MoeLMError
from moe_lm.reporting import dashboard as board
from tests.conftest import read_metrics
from tests.training.helpers import train_in_process

BLOCK = 32 * 1024  # the .wandb file is a leveldb-style log: 32 KiB blocks of framed chunks
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """Yields the protobuf Records of a `run-*.wandb` file (wandb 0.30+ ships no public reader).

    File: 7-byte header (':W&B', magic, version); then chunks, each `crc32c (4) | length (2, LE) |
    type (1) | payload`, never crossing a 32 KiB block (a block tail under 7 bytes is padding); a
    record longer than its block is split FIRST, MIDDLE..., LAST.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, parts = 7, []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the block end
            pos += left
            continue
        parts = [] if kind in (FULL, FIRST) else parts
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            yield record


def wandb_history(run_dir: Path) -> dict[int, dict]:
    """step -> {key: value} of every history row in the run directory's offline wandb run."""
    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    rows: dict[int, dict] = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
               for i in record.history.item}
        rows.setdefault(int(row["_step"]), {}).update(row)
    return rows


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, data_cache):
    """A 6-step tiny run with wandb offline, evals (and heatmaps) at steps 3 and 6."""
    from tests.conftest import TINY_OVERRIDES

    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    run = tmp_path_factory.mktemp("wandb_run") / "run"
    overrides = [*TINY_OVERRIDES, f"data.cache_dir={data_cache}", "model.n_layers=3",
                 "expert=aux_free", "loss=aux_free", "trainer.max_steps=6",
                 "trainer.eval_every=3", "logger.wandb.mode=offline"]
    with initialize_config_module(config_module="moe_lm.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    (run / ".hydra").mkdir(parents=True)  # what python -m moe_lm.train writes before training
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml", resolve=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")  # conftest disables wandb for every other test
    try:
        train_in_process(run, overrides)
    finally:
        mp.undo()
    return run


def test_offline_wandb_run_holds_the_moe_metrics_of_metrics_jsonl(offline_run):
    history = wandb_history(offline_run)
    train = [r for r in read_metrics(offline_run) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7))
    for row in train:
        logged = history[row["step"]]
        for key in ("loss", "aux_loss", "z_loss", "moe/load_imbalance", "moe/dropped_frac",
                    "moe/router_entropy", "moe/layer1/load_cv", "moe/score_bias_absmax"):
            assert logged[key] == pytest.approx(row[key], rel=1e-6), key
        for layer in (0, 1):  # tokens per expert go to wandb as a histogram of the counts
            key = f"moe/layer{layer}/tokens_per_expert"
            assert logged[f"{key}/values"] == row[key]
            assert sum(row[key]) == 4 * 32 * 2  # every token of the batch, twice (top-2)
    heatmaps = {s for s, r in history.items() if "moe/expert_load_heatmap/_type" in r}
    assert heatmaps == {3, 6}
    assert history[6]["moe/expert_load_heatmap/_type"] == "image-file"
    assert (offline_run / "plots" / "expert_load_step_0000006.png").is_file()


def test_dashboard_validates_offline_against_the_runs_own_metrics(offline_run, tmp_path, capsys):
    out = tmp_path / "view.json"
    rc = dashboard.main(["--entity", "someone", "--project", "moe", "--run-dir", str(offline_run),
                         "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "2 MoE layers; valid" in capsys.readouterr().out
    spec = json.loads(out.read_text())
    sections = spec["spec"]["section"]["panelBankConfig"]["sections"]
    assert [s["name"] for s in sections] == ["Loss", "Routing balance", "Routing per layer",
                                             "Throughput"]
    plotted = set(board.plotted_metrics(
        board.build_workspace(board.load_config([], offline_run), "e", "p", "n")))
    assert {"moe/layer0/load_imbalance", "moe/layer1/dropped_frac", "moe/score_bias_absmax",
            "tokens_per_s", "val_loss"} <= plotted


def test_dashboard_run_dir_validates_without_entity_or_project(offline_run, tmp_path, capsys):
    out = tmp_path / "view.json"
    assert dashboard.main(["--run-dir", str(offline_run), "--out", str(out)]) == 0
    assert "for (no entity)/moe_lm: 4 sections" in capsys.readouterr().out  # the run's project
    assert json.loads(out.read_text())["project"] == "moe_lm"
    assert dashboard.main(["--run-dir", str(offline_run), "--save"]) == 2  # saving needs one
    assert "--save needs the wandb entity" in capsys.readouterr().err


def test_dashboard_for_another_model_names_the_metrics_the_run_lacks(offline_run):
    cfg = board.load_config(["model.n_layers=5"], None)  # 4 MoE layers; the run had 2
    workspace = board.build_workspace(cfg, "e", "p", "n")
    with pytest.raises(MoeLMError, match="moe/layer2/"):
        board.validate_workspace(workspace, offline_run)


def test_dashboard_builds_from_overrides_with_a_panel_per_moe_layer_and_no_network():
    cfg = board.load_config(["model.n_layers=6", "model.n_dense_layers=2",
                             "model.moe_every=2"], None)
    assert board.moe_layer_count(cfg) == 2  # layers 2 and 4
    workspace = board.build_workspace(cfg, "e", "p", "n")
    spec = board.validate_workspace(workspace)
    per_layer = next(s for s in workspace.sections if s.name == "Routing per layer")
    titles = [p.title for p in per_layer.panels]
    assert titles[:2] == ["layer 0: balance", "layer 1: balance"]
    assert "moe/score_bias_absmax" not in board.plotted_metrics(workspace)  # no aux_free
    assert spec["project"] == "p" and spec["entity"] == "e"


@pytest.mark.parametrize("argv, words", [
    (["--entity", "e", "--project", "p", "model.d_modle=3"], "do not compose"),
    (["--entity", "e", "--project", "p", "--run-dir", "/nonexistent/run"], "--run-dir"),
    (["--entity", "e", "--project", "p", "expert.top_k=99"], "expert.top_k"),
])
def test_dashboard_cli_bad_input_says_what_to_change(argv, words, capsys):
    assert dashboard.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe_lm: error:") and words in err and "Traceback" not in err


def test_dashboard_save_without_a_wandb_login_fails_with_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no wandb settings
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    assert dashboard.main(["--entity", "e", "--project", "p", "--save"]) == 2
    captured = capsys.readouterr()
    assert "valid" in captured.out  # built and validated before trying the server
    assert "wandb login" in captured.err and "WANDB_API_KEY" in captured.err
