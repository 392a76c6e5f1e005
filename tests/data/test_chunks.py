"""Chunks of the prepare step: they cover the documents exactly once, in order, whatever the cut;
compressed jsonl reads as the plain file; a killed chunk is redone, finished ones are kept."""

from __future__ import annotations

import gzip
import importlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from moe_lm.data import corpus
from moe_lm.data.chunks import chunk_documents, plan_chunks
from moe_lm.data.prepare import load_meta, plan_prepare, prepare
from moe_lm.errors import DataError

from .conftest import DOCS, read_split, split_docs

prepare_mod = importlib.import_module("moe_lm.data.prepare")
MANY = [f"{d} (copy {i})" for i in range(40) for d in DOCS]  # 320 short documents


def write_jsonl(path: Path, docs: list[str]) -> Path:
    """`docs` as JSON lines; compressed by the file's extension (.gz / .zst)."""
    data = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("chunk_kb", [0.3, 1.0, 7.0, 1000.0])
def test_chunks_cover_every_document_once_in_order(tmp_path, chunk_kb):
    root = tmp_path / "d"
    for i, doc in enumerate(DOCS):
        (root / "a").mkdir(parents=True, exist_ok=True)
        (root / "a" / f"{i}.txt").write_text(doc)
    write_jsonl(root / "b" / "big.jsonl", MANY)
    write_jsonl(root / "c" / "small.jsonl.gz", DOCS)
    pq.write_table(pa.table({"text": MANY}), root / "d.parquet", row_group_size=16)
    source = corpus.user_source(str(root))
    chunks = plan_chunks(source, chunk_kb / 1000)
    got = [doc for c in chunks for doc in chunk_documents(source, c)]
    assert got == list(source.documents()) == DOCS + MANY + DOCS + MANY
    assert [c.index for c in chunks] == list(range(len(chunks)))
    if chunk_kb < 1:  # large files are cut into pieces: byte ranges and row-group ranges
        assert sum(1 for c in chunks for p in c.parts if p.path.suffix == ".jsonl") > 10
        assert sum(1 for c in chunks for p in c.parts if p.path.suffix == ".parquet") > 5
    elif chunk_kb >= 1000:  # the whole corpus is smaller than one chunk
        assert len(chunks) == 1


@pytest.mark.parametrize("ext", [".jsonl.gz", ".jsonl.zst"])
def test_compressed_jsonl_prepares_to_the_plain_files_shards(tmp_path, data_cfg, tok, ext):
    plain = prepare(data_cfg(write_jsonl(tmp_path / "p" / "docs.jsonl", MANY)), tok)
    packed = prepare(data_cfg(write_jsonl(tmp_path / "z" / f"docs{ext}", MANY)), tok)
    assert packed != plain  # other files, other fingerprint ...
    for split in ("train", "val"):  # ... the same tokens
        assert read_split(packed, split).tobytes() == read_split(plain, split).tobytes()


def test_corrupt_line_in_compressed_jsonl_names_file_and_line(tmp_path, data_cfg, tok):
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "fine"}\n{"text": oops}\n'))
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz:2 is not valid JSON"):
        prepare(data_cfg(path), tok)


def test_multi_chunk_prepare_splits_val_by_document_inside_each_chunk(tmp_path, data_cfg, tok):
    cfg = data_cfg(write_jsonl(tmp_path / "docs.jsonl", MANY), chunk_mb=0.004, val_fraction=0.1)
    plan = plan_prepare(cfg, tok)
    shard_dir = prepare(cfg, tok)
    meta = load_meta(shard_dir)
    assert meta["chunks"] == len(plan.chunks) > 3
    assert meta["documents"]["total"] == len(MANY)
    assert meta["train_tokens"] + meta["val_tokens"] == sum(len(tok.encode(d)) + 1 for d in MANY)
    records = [json.loads(p.read_text()) for p in sorted((shard_dir / "chunks").iterdir())]
    assert all(r["documents"]["val"] >= 1 and r["documents"]["train"] >= 1 for r in records)
    # The stream of shards is the documents in order, each split keeping the corpus order.
    train = [tok.decode(d) for d in split_docs(read_split(shard_dir, "train"), tok.eot_id)]
    val = [tok.decode(d) for d in split_docs(read_split(shard_dir, "val"), tok.eot_id)]
    assert sorted(train + val) == sorted(MANY)
    assert train == [d for d in MANY if d in set(train)]


def test_killed_chunk_is_redone_and_finished_chunks_are_kept(tmp_path, data_cfg, tok,
                                                             monkeypatch):
    cfg = data_cfg(write_jsonl(tmp_path / "docs.jsonl", MANY), chunk_mb=0.004)
    reference = prepare(data_cfg(tmp_path / "docs.jsonl", chunk_mb=0.004,
                                 cache_dir=str(tmp_path / "ref")), tok)
    real, calls = prepare_mod.write_chunk, []

    def dies_at_chunk_3(plan, index, tokenizer):
        calls.append(index)
        if index == 3:
            (plan.partial / "train_00003_000.bin").write_bytes(b"\1" * 40)  # half-written
            raise KeyboardInterrupt
        return real(plan, index, tokenizer)

    monkeypatch.setattr(prepare_mod, "write_chunk", dies_at_chunk_3)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, tok)
    plan = plan_prepare(cfg, tok)
    assert not plan.done and sorted(p.name for p in (plan.partial / "chunks").iterdir()) == [
        f"chunk_{i:05d}.json" for i in range(3)]
    kept = {i: plan.marker(i).stat().st_mtime_ns for i in range(3)}
    monkeypatch.setattr(prepare_mod, "write_chunk", real)
    shard_dir = prepare(cfg, tok)
    assert {i: (shard_dir / "chunks" / f"chunk_{i:05d}.json").stat().st_mtime_ns
            for i in range(3)} == kept  # not tokenized again
    assert same_shards(shard_dir, reference)


def same_shards(a: Path, b: Path) -> bool:
    """Whether two prepared directories hold byte-identical shards and the same meta.json
    (apart from the time it took)."""
    ma, mb = load_meta(a), load_meta(b)
    ma.pop("seconds"), mb.pop("seconds")
    files = sorted(p.name for p in a.glob("*.bin"))
    return ma == mb and files == sorted(p.name for p in b.glob("*.bin")) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files)
