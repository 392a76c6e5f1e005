"""A training run on a three-source mixture: its per-source validation rows equal `moe_lm.eval`'s
loss of the final checkpoint on each source's validation split alone (and reach wandb and the
sweep report with the same values), the run says how many epochs of each source it read, and a
resumed run repeats the uninterrupted run's losses."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from moe_lm import eval as eval_cli
from moe_lm.config import DataConfig
from moe_lm.data import TokenLoader, get_tokenizer, prepare
from moe_lm.errors import ConfigError, MoeLMError
from moe_lm.training import loop
from moe_lm.inference.evaluate import evaluate_batches
from moe_lm.inference import load_model
from moe_lm.inference.text import token_byte_lengths
from moe_lm.reporting import dashboard as board
from moe_lm.reporting.sweep_report import write_report

from ..conftest import TINY_OVERRIDES, read_metrics, train_losses
from ..sweeps.helpers import report_row
from ..training.helpers import train_in_process, train_run
from ..training.test_routing_wandb_dashboard import wandb_history


def write_source(root: Path, files: list[Path]) -> Path:
    root.mkdir(parents=True)
    with open(root / "docs.jsonl", "w") as f:
        for p in files:
            f.write(json.dumps({"text": p.read_text(errors="replace")}) + "\n")
    return root


WEIGHTS = {"web": 0.6, "code": 0.3, "books": 0.1}


def mixture_overrides(tmp_path: Path) -> tuple[dict[str, Path], list[str]]:
    """Three sources of ten stdlib files each, and the tiny run's overrides that mix them."""
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    paths = {name: write_source(tmp_path / name, stdlib[10 * i:10 * i + 10])
             for i, name in enumerate(WEIGHTS)}
    sources = ",".join(f"{{name: {n}, path: {paths[n]}, weight: {w}}}"
                       for n, w in WEIGHTS.items())
    return paths, [*TINY_OVERRIDES, f"data.cache_dir={tmp_path / 'cache'}",
                   "data.val_fraction=0.2", f"data.sources=[{sources}]"]


@pytest.mark.slow
def test_per_source_val_rows_equal_eval_on_each_source(tmp_path, monkeypatch, capsys):
    weights = WEIGHTS
    paths, base = mixture_overrides(tmp_path)
    run = tmp_path / "sweep" / "0"  # a one-job sweep directory, for the sweep report
    overrides = [*base, "trainer.max_steps=4", "trainer.eval_every=4", "trainer.ckpt_every=4",
                 "logger.wandb.mode=offline"]
    monkeypatch.setenv("WANDB_MODE", "offline")  # conftest disables wandb for other tests
    train_run(run, overrides)  # as the CLI does: .hydra/config.yaml holds the mixture
    final = [r for r in read_metrics(run) if "val_loss" in r][-1]
    assert final["step"] == 4
    assert final["val_loss"] == pytest.approx(
        sum(w * final[f"val/{n}/loss"] for n, w in weights.items()), rel=1e-6)
    loaded = load_model(run, device="cpu")
    tok = get_tokenizer("cl100k_base")
    lengths = token_byte_lengths(tok, loaded.cfg.model.vocab_size)
    capsys.readouterr()
    for name in weights:
        # the reference: the source prepared alone, as a run on data.path=<its files> would
        cfg = DataConfig(path=str(paths[name]), seq_len=32, batch_size=4, val_fraction=0.2,
                         cache_dir=str(tmp_path / "cache"))
        val = TokenLoader(prepare(cfg, tok), "val", 32, 4, seed=loaded.cfg.trainer.seed)
        alone = evaluate_batches(loaded.model, val.val_batches(2), lengths, "fp32")
        assert final[f"val/{name}/loss"] == pytest.approx(alone.loss, abs=1e-5)
        # python -m moe_lm.eval RUN --source NAME: the same split, the same tokens
        assert eval_cli.main([str(run), "--device", "cpu", "--source", name, "--json"]) == 0
        row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert row["data"] == f"val split of source {name}"
        assert (row["tokens"], row["batches"]) == (alone.tokens, 2) == (2 * 4 * 32, 2)
        assert row["loss"] == pytest.approx(final[f"val/{name}/loss"], abs=1e-5)
        assert 0 < final[f"data/{name}/epochs"] < 1
    with pytest.raises(ConfigError, match=r"mixture of the sources \['web', 'code', 'books'\]"):
        eval_cli.main([str(run), "--device", "cpu"])  # which source: it must be said

    logged = wandb_history(run)[4]  # wandb receives the rows of metrics.jsonl
    for key in ("val_loss", *(f"val/{n}/loss" for n in weights)):
        assert logged[key] == pytest.approx(final[key], rel=1e-6), key
    workspace = board.build_workspace(board.load_config([], run), "e", "p", "n")
    assert {"val/books/loss", "data/code/epochs"} <= set(board.plotted_metrics(workspace))
    board.validate_workspace(workspace, run)  # every panel's metric is in metrics.jsonl
    text, _ = write_report(tmp_path / "sweep")
    assert report_row(text, 0)[8:11] == [f"{final[f'val/{n}/loss']:.4f}" for n in weights]

    log = (run / "train.log").read_text()  # the run says how much of each source it read
    seen = next(line for line in log.splitlines() if "data seen: " in line)
    for name in weights:
        assert f"{name} {final[f'data/{name}/epochs']:.3g} epochs" in seen
    planned = next(line for line in log.splitlines() if "mixture over 4 steps: " in line)
    assert "web 60% (" in planned and "books 10% (" in planned


@pytest.mark.parametrize("bad, error", [
    ("weight: 0", r"source 'books' has weight 0"),
    ("weight: -0.5", r"source 'books' has weight -0.5"),
    ("missing", r"source 'books' \(path=.*nope.*does not exist"),
    ("empty", r"source 'books' .*No text found"),
])
def test_bad_source_fails_before_the_model_is_built(tmp_path, monkeypatch, bad, error):
    paths, base = mixture_overrides(tmp_path)
    books = f"{{name: books, path: {paths['books']}, weight: 0.1}}"
    if bad.startswith("weight"):
        wrong = books.replace("weight: 0.1", bad)
    elif bad == "missing":
        wrong = books.replace(str(paths["books"]), str(tmp_path / "nope"))
    else:
        (paths["books"] / "docs.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
        wrong = books
    overrides = [o.replace(books, wrong) for o in base]
    assert overrides != base or bad == "empty"

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(loop, "Transformer", no_model)
    with pytest.raises(MoeLMError, match=error):
        train_in_process(tmp_path / "run", [*overrides, "trainer.max_steps=2"])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_resumed_mixture_run_repeats_the_uninterrupted_losses(tmp_path):
    _, base = mixture_overrides(tmp_path)
    steps = [*base, "trainer.max_steps=8", "trainer.ckpt_every=4"]
    train_in_process(tmp_path / "full", steps)
    train_in_process(tmp_path / "split", [*steps, "trainer.stop_at=4"])
    assert max(train_losses(tmp_path / "split")) == 4
    train_in_process(tmp_path / "split", steps)
    full, split = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert [split[s] for s in range(5, 9)] == [full[s] for s in range(5, 9)]
