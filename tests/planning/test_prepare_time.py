"""The plan's data-preparation estimate: a per-worker rate measured on the run's own text, which
a real prepare of that text reaches, and times that scale with the workers."""

from __future__ import annotations

import json
import resource
from dataclasses import replace

import pytest

from moe_lm.config import DataConfig, PrepareConfig, SourceConfig, TrainConfig
from moe_lm.data import get_tokenizer, load_meta, prepare
from moe_lm.planning.prepare_time import SLURM_TASKS, prepare_estimate
from moe_lm.planning.report import prepare_line
from tests.data.conftest import DOCS


def write_docs(path, n: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": f"{i}: {DOCS[i % len(DOCS)] * 40}"}) + "\n"
                            for i in range(n)))
    return path


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def test_estimate_measures_the_runs_own_text_and_a_real_prepare_reaches_its_rate(tmp_path):
    root = write_docs(tmp_path / "web" / "docs.jsonl", 800).parent  # ~2.3 MB of jsonl
    cfg = TrainConfig(data=DataConfig(path=str(root), cache_dir=str(tmp_path / "cache")),
                      prepare=PrepareConfig(workers=4))
    est = prepare_estimate(cfg, 2_100_000_000_000)
    tok = get_tokenizer("cl100k_base")
    sample = est["sample"]
    assert sample["where"] == "the run's data" and sample["bytes"] >= 1_000_000
    assert sample["tokens"] == sum(len(tok.encode(json.loads(line)["text"])) + 1 for line in
                                   (root / "docs.jsonl").read_text().splitlines()[:len_docs(
                                       root, sample["bytes"])])
    rate = est["tokens_per_worker_s"]
    assert est["seconds"]["1"] == pytest.approx(2.1e12 / rate)
    assert est["seconds"]["4"] == pytest.approx(est["seconds"]["1"] / 4)
    assert est["seconds"][f"slurm_{SLURM_TASKS}"] == pytest.approx(est["seconds"]["1"] / 1000)
    # the whole prepare step (reading, tokenizing, splitting, writing) of the same text, in CPU
    # seconds of this process: it reaches the estimated rate within a factor of 2
    before = cpu_s()
    meta = load_meta(prepare(cfg.data, tok))
    real = (meta["train_tokens"] + meta["val_tokens"]) / (cpu_s() - before)
    print(f"estimated {rate:,.0f} tokens per CPU-s, whole prepare {real:,.0f}")
    assert rate / 2 <= real <= rate * 2, (rate, real)
    line = prepare_line(est)
    assert "of 2.100T tokens at " in line and "with 4 workers" in line
    assert f"with {SLURM_TASKS} SLURM tasks" in line


def len_docs(root, nbytes: int) -> int:
    """How many documents of the file the sample took (the first ones up to `nbytes` of text)."""
    size = 0
    for n, line in enumerate((root / "docs.jsonl").read_text().splitlines(), 1):
        size += len(json.loads(line)["text"].encode())
        if size >= nbytes:
            return n
    return n


def test_a_mixture_samples_every_source_and_a_missing_path_falls_back(tmp_path):
    a = write_docs(tmp_path / "a" / "d.jsonl", 400).parent
    b = write_docs(tmp_path / "b" / "d.jsonl", 400).parent
    mix = TrainConfig(data=DataConfig(sources=[SourceConfig("web", str(a), 1.0),
                                               SourceConfig("code", str(b), 1.0)]))
    assert prepare_estimate(mix, 10**9)["sample"]["where"] == "the run's data"
    cluster = replace(mix, data=DataConfig(path="/nowhere/corpus"))
    est = prepare_estimate(cluster, 10**9)
    assert est["sample"]["where"].startswith("the built-in corpus (the run's data is not")
    assert est["sample"]["tokens"] > 100_000 and est["tokens_per_worker_s"] > 0
