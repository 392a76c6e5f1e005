"""A training run on a three-source mixture: its per-source validation rows equal `moe_lm.eval`'s
loss of the final checkpoint on each source's validation split alone."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from moe_lm.config import DataConfig
from moe_lm.data import TokenLoader, get_tokenizer, prepare
from moe_lm.eval import evaluate_batches
from moe_lm.inference import load_model
from moe_lm.inference.text import token_byte_lengths

from ..conftest import TINY_OVERRIDES, read_metrics
from ..training.helpers import train_in_process


def write_source(root: Path, files: list[Path]) -> Path:
    root.mkdir(parents=True)
    with open(root / "docs.jsonl", "w") as f:
        for p in files:
            f.write(json.dumps({"text": p.read_text(errors="replace")}) + "\n")
    return root


@pytest.mark.slow
def test_per_source_val_rows_equal_eval_on_each_source(tmp_path):
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    weights = {"web": 0.6, "code": 0.3, "books": 0.1}
    paths = {name: write_source(tmp_path / name, stdlib[10 * i:10 * i + 10])
             for i, name in enumerate(weights)}
    sources = ",".join(f"{{name: {n}, path: {paths[n]}, weight: {w}}}"
                       for n, w in weights.items())
    run = tmp_path / "run"
    overrides = [*TINY_OVERRIDES, f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.2",
                 f"data.sources=[{sources}]", "trainer.max_steps=4", "trainer.eval_every=4",
                 "trainer.ckpt_every=4"]
    train_in_process(run, overrides)
    final = [r for r in read_metrics(run) if "val_loss" in r][-1]
    assert final["step"] == 4
    assert final["val_loss"] == pytest.approx(
        sum(w * final[f"val/{n}/loss"] for n, w in weights.items()), rel=1e-6)
    loaded = load_model(run, device="cpu")
    tok = get_tokenizer("cl100k_base")
    lengths = token_byte_lengths(tok, loaded.cfg.model.vocab_size)
    for name in weights:
        cfg = DataConfig(path=str(paths[name]), seq_len=32, batch_size=4, val_fraction=0.2,
                         cache_dir=str(tmp_path / "cache"))
        val = TokenLoader(prepare(cfg, tok), "val", 32, 4, seed=loaded.cfg.trainer.seed)
        alone = evaluate_batches(loaded.model, val.val_batches(2), lengths, "fp32")
        assert final[f"val/{name}/loss"] == pytest.approx(alone.loss, abs=1e-5)
        assert 0 < final[f"data/{name}/epochs"] < 1
