"""Every routing preset trains the tiny model on CPU and lowers the loss; the routing metrics,
bias values, heatmaps and alerts reach metrics.jsonl, the console and an offline wandb run."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.conftest import read_metrics
from tests.training.helpers import train_in_process

STEPS = [
    "trainer.max_steps=8", "trainer.log_every=2", "trainer.eval_every=8", "trainer.ckpt_every=8",
    "trainer.monitor.window=4", "optim.lr=3e-3",
]


@pytest.mark.parametrize("preset, extra", [
    ("top2", []),
    ("top2_capacity", ["expert.jitter=0.01"]),
    ("sigmoid", ["loss=sequence"]),
    ("expert_choice", ["expert.num_shared=1"]),
    ("aux_free", ["loss=aux_free"]),
])
def test_each_preset_trains_lowers_the_loss_and_logs_its_routing(tmp_path, tiny_overrides,
                                                                  capsys, preset, extra):
    run = tmp_path / preset
    train_in_process(run, [*tiny_overrides, *STEPS, f"expert={preset}", *extra])
    out = capsys.readouterr().out
    rows = read_metrics(run)
    evals = [r for r in rows if "val_loss" in r]
    assert [e["step"] for e in evals] == [0, 8]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    train = [r for r in rows if "loss" in r]
    last = train[-1]
    for key in ("loss", "lm_loss", "aux_loss", "z_loss", "moe/load_imbalance", "moe/dropped_frac",
                "moe/router_entropy", "moe/layer0/tokens_per_expert", "moe/layer0/load_cv"):
        assert key in last, key
    loads = [r["moe/layer0/tokens_per_expert"] for r in train]
    if preset == "expert_choice":  # every expert takes C = T * k / E tokens, no balance loss
        assert all(t == [4 * 32 * 2 // 4 * 2] * 4 for t in loads)  # 2 steps per logged row
        assert all(r["aux_loss"] == 0.0 for r in train)
    if preset == "top2_capacity":
        assert any(r["moe/dropped_frac"] > 0 for r in train)
    if preset in ("top2", "sigmoid", "aux_free"):
        assert all(r["moe/dropped_frac"] == 0 for r in train)
    if preset == "aux_free":
        bias = [r["moe/layer0/score_bias"] for r in train]
        assert any(b != [0.0] * 4 for b in bias) and last["moe/score_bias_absmax"] > 0
        assert last["moe/score_bias_absmax"] <= 8 * 0.001 + 1e-9  # at most rate per step
    else:
        assert "moe/layer0/score_bias" not in last
    assert (run / "plots" / "expert_load_step_0000008.png").is_file()
    assert "WARNING" not in out  # a healthy run raises no routing alert


def read_wandb_records(path: Path):
    """The records of a wandb run file (`run-*.wandb`): a 7-byte header (`:W&B`, magic 0xBEE1,
    version), then LevelDB-log framing: 32 KiB blocks of chunks, each chunk with a 7-byte header
    (crc32 4 bytes, length 2, type 1: full, first, middle, last), holding protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    block, pos, parts = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full or last chunk: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def wandb_history(run_dir: Path) -> dict[int, dict]:
    """step -> {metric key: value} from the offline wandb run of a training run directory."""
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    history: dict[int, dict] = {}
    for record in read_wandb_records(run_file):
        if record.WhichOneof("record_type") != "history":
            continue
        items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                 for i in record.history.item}
        history.setdefault(int(items["_step"]), {}).update(items)
    return history


def test_offline_wandb_run_holds_the_moe_metrics_bias_and_heatmap(tmp_path, tiny_overrides,
                                                                  monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    train_in_process(run, [*tiny_overrides, *STEPS, "expert=aux_free", "logger.wandb.mode=offline",
                           "trainer.monitor.dead_frac=0.99", "trainer.monitor.window=2"])
    history = wandb_history(run)
    rows = {r["step"]: r for r in read_metrics(run) if "loss" in r}
    assert set(rows) <= set(history)
    last = history[8]
    for key in ("loss", "lm_loss", "aux_loss", "z_loss", "moe/load_imbalance",
                "moe/dropped_frac", "moe/router_entropy", "moe/layer0/load_imbalance",
                "moe/layer0/load_cv", "moe/layer0/dropped_frac", "moe/layer0/router_entropy",
                "moe/score_bias_absmax"):
        assert last[key] == pytest.approx(rows[8][key]), key
    assert last["moe/layer0/tokens_per_expert/_type"] == "histogram"
    assert last["moe/layer0/tokens_per_expert/values"] == rows[8]["moe/layer0/tokens_per_expert"]
    assert last["moe/layer0/score_bias/values"] == pytest.approx(rows[8]["moe/layer0/score_bias"])
    assert last["moe/expert_load_heatmap/_type"] == "image-file"
    image = next(run.glob("wandb/offline-run-*/files")) / last["moe/expert_load_heatmap/path"]
    assert image.is_file() and image.read_bytes()[:4] == b"\x89PNG"
    # dead_frac=0.99 calls any expert under 99% of the mean dead: the alert path fires
    assert "WARNING: dead expert: layer 0 expert" in capsys.readouterr().out
