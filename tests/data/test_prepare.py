"""The prepare step: txt/jsonl/parquet -> uint32 shards with EOT between documents, a by-document
validation split, the built-in corpus, and an atomic cache that is re-used."""

from __future__ import annotations

import importlib
import json
import sysconfig
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_lm.data import corpus
from moe_lm.data.prepare import load_meta, prepare, val_document_indices

from .conftest import DOCS, read_split, split_docs

# The package exports the function `prepare`, which shadows the submodule's attribute name.
prepare_mod = importlib.import_module("moe_lm.data.prepare")


def write_docs(root: Path, fmt: str, docs: list[str]) -> Path:
    """Writes `docs` in one format; returns what data.path should point at."""
    root.mkdir(parents=True, exist_ok=True)
    if fmt in ("txt", "md"):
        for i, doc in enumerate(docs):
            (root / f"doc_{i:03d}.{fmt}").write_text(doc, encoding="utf-8")
        return root
    if fmt == "jsonl":
        path = root / "docs.jsonl"
        path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n"
                                for i, d in enumerate(docs)), encoding="utf-8")
        return path
    if fmt == "parquet":
        path = root / "docs.parquet"
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path,
                       row_group_size=3)
        return path
    raise ValueError(fmt)


@pytest.mark.parametrize("fmt", ["txt", "md", "jsonl", "parquet"])
def test_prepare_writes_eot_separated_shards_with_exact_token_count(tmp_path, data_cfg, tok, fmt):
    path = write_docs(tmp_path / "data", fmt, DOCS)
    shard_dir = prepare(data_cfg(path), tok)
    meta = load_meta(shard_dir)

    expected = sum(len(tok.encode(d)) + 1 for d in DOCS)  # each document + one EOT
    assert meta["train_tokens"] + meta["val_tokens"] == expected
    train, val = read_split(shard_dir, "train"), read_split(shard_dir, "val")
    assert train.dtype == np.uint32 and len(train) == meta["train_tokens"]
    assert len(val) == meta["val_tokens"]
    assert (train == tok.eot_id).sum() + (val == tok.eot_id).sum() == len(DOCS)
    assert meta["tokenizer"] == {"name": "cl100k_base", "n_vocab": tok.n_vocab,
                                 "eot_id": tok.eot_id, "source": tok.source}
    assert meta["documents"] == {"total": len(DOCS), "train": 6, "val": 2}
    assert len(meta["fingerprint"]) == 64 and meta["source"]["kind"] == "user"


def test_val_split_is_disjoint_from_train_by_document(tmp_path, data_cfg, tok):
    shard_dir = prepare(data_cfg(write_docs(tmp_path / "d", "jsonl", DOCS)), tok)
    train = [tok.decode(d) for d in split_docs(read_split(shard_dir, "train"), tok.eot_id)]
    val = [tok.decode(d) for d in split_docs(read_split(shard_dir, "val"), tok.eot_id)]
    assert val and train
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(DOCS)
    # Order inside each split follows the corpus order.
    assert train == [d for d in DOCS if d in train] and val == [d for d in DOCS if d in val]


def test_val_document_indices_are_spread_and_bounded():
    assert val_document_indices(1, 0.02) == set()
    assert val_document_indices(2, 0.02) == {1}  # at least one, never all
    assert val_document_indices(3, 0.49) == {1}
    assert val_document_indices(100, 0.02) == {25, 75}
    assert len(val_document_indices(1000, 0.1)) == 100


def test_single_document_splits_off_its_tail_tokens(tmp_path, data_cfg, tok):
    text = " ".join(DOCS) * 4
    path = tmp_path / "one.txt"
    path.write_text(text)
    shard_dir = prepare(data_cfg(path, val_fraction=0.1), tok)
    ids = tok.encode(text)
    n_val = round(len(ids) * 0.1)
    assert read_split(shard_dir, "train").tolist() == ids[:-n_val] + [tok.eot_id]
    assert read_split(shard_dir, "val").tolist() == ids[-n_val:] + [tok.eot_id]


def test_directory_mixes_formats_in_sorted_order_and_skips_others(tmp_path, data_cfg, tok):
    root = tmp_path / "mixed"
    write_docs(root / "a", "txt", DOCS[:3])
    write_docs(root / "b", "jsonl", DOCS[3:6])
    write_docs(root / "c", "parquet", DOCS[6:])
    (root / "notes.csv").write_text("ignored,file\n")
    (root / ".hidden.txt").write_text("hidden files are skipped")
    assert list(corpus.user_source(str(root)).documents()) == DOCS


def test_second_prepare_reuses_the_cache_without_tokenizing(tmp_path, data_cfg, tok, monkeypatch):
    cfg = data_cfg(write_docs(tmp_path / "d", "txt", DOCS))
    first = prepare(cfg, tok)
    meta_mtime = (first / "meta.json").stat().st_mtime_ns

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("prepare tokenized again instead of using the cache")

    monkeypatch.setattr(prepare_mod, "write_chunk", no_tokenizing)
    start = time.perf_counter()
    assert prepare(cfg, tok) == first
    assert time.perf_counter() - start < 1.0
    assert (first / "meta.json").stat().st_mtime_ns == meta_mtime


def test_changed_files_or_settings_get_a_new_cache(tmp_path, data_cfg, tok):
    root = write_docs(tmp_path / "d", "txt", DOCS)
    first = prepare(data_cfg(root), tok)
    assert prepare(data_cfg(root, val_fraction=0.3), tok) != first
    (root / "doc_000.txt").write_text(DOCS[0] + " One more sentence.")
    assert prepare(data_cfg(root), tok) != first


def test_killed_prepare_leaves_no_cache_and_the_next_one_succeeds(tmp_path, data_cfg, tok,
                                                                  monkeypatch):
    cfg = data_cfg(write_docs(tmp_path / "d", "txt", DOCS))
    real = prepare_mod.write_chunk

    def dies_halfway(plan, index, tokenizer):
        (plan.partial / f"train_{index:05d}_000.bin").write_bytes(b"\0" * 12)  # a partial shard
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_mod, "write_chunk", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, tok)
    tokens_dir = Path(cfg.cache_dir) / "tokens"
    # nothing is published; only the hidden partial directory remains, to be continued
    assert [p.name[:9] for p in tokens_dir.iterdir() if p.is_dir()] == [".partial-"]
    monkeypatch.setattr(prepare_mod, "write_chunk", real)
    shard_dir = prepare(cfg, tok)
    assert load_meta(shard_dir)["train_tokens"] > 0


def test_stale_temp_dir_from_a_killed_process_is_removed(tmp_path, data_cfg, tok):
    cfg = data_cfg(write_docs(tmp_path / "d", "txt", DOCS))
    shard_dir = prepare(cfg, tok)
    stale = shard_dir.parent / f".tmp-{shard_dir.name}-dead"
    stale.mkdir()
    (shard_dir / "meta.json").unlink()  # force a rebuild
    assert prepare(cfg, tok) == shard_dir
    assert not stale.exists() and (shard_dir / "meta.json").is_file()


def test_builtin_corpus_is_cpython_text_capped_and_deterministic(data_cfg, tok):
    cfg = data_cfg(None, corpus_mb=0.3, val_fraction=0.05)
    source = corpus.open_source(None, 0.3)
    docs = list(source.documents())
    assert sum(len(d.encode("utf-8")) for d in docs) <= 300_000
    assert sum(len(d.encode("utf-8")) for d in docs) > 290_000
    assert docs == list(corpus.open_source(None, 0.3).documents())
    from pydoc_data.topics import topics
    assert docs[0] == topics[sorted(topics)[0]]  # the documentation comes first

    shard_dir = prepare(cfg, tok)
    meta = load_meta(shard_dir)
    assert meta["source"]["kind"] == "builtin" and "CPython" in meta["source"]["description"]
    assert meta["train_tokens"] > 50_000 and meta["val_tokens"] > 1_000
    assert meta["documents"]["total"] == len(docs)


def test_stdlib_sources_exclude_tests_site_packages_and_generated_files():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p.relative_to(root).as_posix() for p in corpus.stdlib_sources()]
    assert files and all(f.endswith(".py") for f in files)
    assert not any(part in ("site-packages", "test", "tests") for f in files
                   for part in f.split("/"))
    rel = set(files)
    assert "argparse.py" in rel
    assert not rel & {"keyword.py", "token.py", "stringprep.py", "encodings/cp1252.py"}
    assert not any("_sysconfigdata" in f for f in rel)
    assert files == sorted(files)
