"""eval, prune and quantize show progress bars with an ETA (stderr) and say what they computed in."""

from __future__ import annotations

import json
import re

import pytest

from moe_lm import eval as eval_cli
from moe_lm import prune as prune_cli
from moe_lm import quantize as quantize_cli

BAR = r"{desc}: 100%\|.*\| 2/2 \[\d\d:\d\d<00:00"  # tqdm: count of total, elapsed < remaining


@pytest.fixture
def bars(monkeypatch):
    monkeypatch.setenv("MOE_LM_PROGRESS", "1")  # captured stderr is no terminal: force the bars


def assert_bar(err: str, desc: str) -> None:
    assert re.search(BAR.format(desc=re.escape(desc)), err), err


def test_eval_shows_a_bar_and_names_precision_and_quantization(tiny_run, bars, capsys):
    assert eval_cli.main([str(tiny_run), "--batches", "2"]) == 0
    out, err = capsys.readouterr()
    assert_bar(err, "eval (fp32)")  # the tiny run trains in fp32
    assert "experts unquantized, computed in fp32" in out
    assert eval_cli.main([str(tiny_run), "--batches", "2", "--quantize", "int8", "--precision",
                          "bf16", "--json"]) == 0
    out, err = capsys.readouterr()
    assert_bar(err, "eval (bf16)")
    row = json.loads(out)  # stdout stays one JSON object: the bars go to stderr
    assert row["quantize"] == "int8" and row["precision"] == "bf16"


def test_eval_data_bar_counts_the_windows_of_the_files(tiny_run, bars, capsys, tmp_path):
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    assert eval_cli.main([str(tiny_run), "--data", str(tmp_path), "--seq-len", "32",
                          "--batch-size", "4", "--json"]) == 0
    out, err = capsys.readouterr()
    batches = json.loads(out)["batches"]
    assert re.search(rf"eval \(fp32\): 100%\|.*\| {batches}/{batches} \[", err), err
    assert "tokenize" in err


def test_prune_and_quantize_show_a_bar_per_pass(tiny_run, bars, capsys, tmp_path):
    assert prune_cli.main([str(tiny_run), "--keep", "2", "--batches", "2",
                           "--out", str(tmp_path / "pruned")]) == 0
    out, err = capsys.readouterr()
    for desc in ("expert usage", "before pruning (fp32)", "after pruning (fp32)"):
        assert_bar(err, desc)
    assert "computed in fp32" in out
    assert quantize_cli.main([str(tiny_run), "--batches", "2"]) == 0
    out, err = capsys.readouterr()
    for desc in ("before int8 (fp32)", "int8 experts (fp32)"):
        assert_bar(err, desc)
    assert "computed in fp32" in out
