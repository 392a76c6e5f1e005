"""Bad inputs to the importer: each one clear error, and nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moe_lm.errors import CheckpointError, ConfigError, MoeLMError
from moe_lm.interop.import_hf import import_hf
from tests.interop.conftest import hf_config, save_hf_model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_models")
    save_hf_model(root / "one", hf_config("mixtral", num_hidden_layers=2))
    save_hf_model(root / "sharded", hf_config("mixtral", num_hidden_layers=2), max_shard_size="60KB")
    return {"one": root / "one", "sharded": root / "sharded"}


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _fails(hf_dir: Path, out: Path, error: type, *words: str) -> None:
    with pytest.raises(error) as info:
        import_hf(hf_dir, out)
    message = str(info.value)
    assert all(w in message for w in words), message
    assert "\n" not in message
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_missing_config_json_is_refused(hf_dirs, tmp_path):
    bad = _copy(hf_dirs["one"], tmp_path / "hf")
    (bad / "config.json").unlink()
    _fails(bad, tmp_path / "run", ConfigError, "config.json does not exist")


def test_missing_shard_is_refused(hf_dirs, tmp_path):
    bad = _copy(hf_dirs["sharded"], tmp_path / "hf")
    shard = sorted(bad.glob("model-*.safetensors"))[1]
    shard.unlink()
    _fails(bad, tmp_path / "run", CheckpointError, shard.name, "missing shards")


def test_truncated_safetensors_file_is_refused(hf_dirs, tmp_path):
    bad = _copy(hf_dirs["one"], tmp_path / "hf")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    _fails(bad, tmp_path / "run", CheckpointError, "model.safetensors", "truncated")


def test_unknown_model_type_is_refused(hf_dirs, tmp_path):
    bad = _copy(hf_dirs["one"], tmp_path / "hf")
    _edit_config(bad, model_type="deepseek_v3")
    _fails(bad, tmp_path / "run", ConfigError, "model_type='deepseek_v3'", "mixtral")


def test_shapes_that_do_not_match_config_json_are_refused(hf_dirs, tmp_path):
    bad = _copy(hf_dirs["one"], tmp_path / "hf")
    _edit_config(bad, intermediate_size=40)
    _fails(bad, tmp_path / "run", CheckpointError, "has shape", "[48, 64]", "[40, 64]")


@pytest.mark.parametrize("change, words", [
    (dict(sliding_window=64), "sliding_window=64"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                           "original_max_position_embeddings": 64}), "rope_type='yarn'"),
])
def test_settings_moe_lm_cannot_express_are_refused_by_name(hf_dirs, tmp_path, change, words):
    bad = _copy(hf_dirs["one"], tmp_path / "hf")
    _edit_config(bad, **change)
    _fails(bad, tmp_path / "run", ConfigError, words)


def test_an_existing_output_directory_is_never_written_over(hf_dirs, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="never writes over"):
        import_hf(hf_dirs["one"], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_prints_one_error_line_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moe_lm.import_hf", str(tmp_path / "nope"),
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("moe_lm: error:")]
    assert len(errors) == 1 and "config.json does not exist" in errors[0]
    assert not (tmp_path / "run").exists()
    assert issubclass(ConfigError, MoeLMError)
