"""Bad data input: each case raises DataError with a message that names what to change."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_lm.data import TokenLoader, prepare
from moe_lm.errors import DataError

from .conftest import DOCS, make_shard_dir


def prepare_error(cfg, tok) -> str:
    with pytest.raises(DataError) as err:
        prepare(cfg, tok)
    return str(err.value)


def test_missing_path(tmp_path, data_cfg, tok):
    msg = prepare_error(data_cfg(tmp_path / "nope"), tok)
    assert "does not exist" in msg and "data.path" in msg and "built-in corpus" in msg


def test_directory_without_supported_files(tmp_path, data_cfg, tok):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "table.csv").write_text("a,b\n1,2\n")
    msg = prepare_error(data_cfg(tmp_path / "d"), tok)
    assert "no supported files" in msg and ".csv" in msg and ".jsonl" in msg
    (tmp_path / "empty").mkdir()
    assert "it is empty" in prepare_error(data_cfg(tmp_path / "empty"), tok)


def test_unsupported_extension(tmp_path, data_cfg, tok):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n")
    msg = prepare_error(data_cfg(path), tok)
    assert "'.csv'" in msg and "unsupported" in msg and ".parquet" in msg


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_empty_files_have_no_text(tmp_path, data_cfg, tok, kind):
    root = tmp_path / "d"
    root.mkdir()
    if kind == "txt":
        (root / "a.txt").write_text("")
        (root / "b.txt").write_text("  \n\n")
    elif kind == "jsonl":
        (root / "a.jsonl").write_text(json.dumps({"text": ""}) + "\n\n")
    else:
        pq.write_table(pa.table({"text": pa.array([None, ""], pa.string())}), root / "a.parquet")
    msg = prepare_error(data_cfg(root), tok)
    assert "No text found" in msg and "data.path" in msg


def test_jsonl_without_text_field(tmp_path, data_cfg, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": DOCS[0]}) + "\n" + json.dumps({"body": "x"}) + "\n")
    msg = prepare_error(data_cfg(path), tok)
    assert "d.jsonl:2" in msg and '"text"' in msg and "'body'" in msg


def test_jsonl_with_a_broken_line(tmp_path, data_cfg, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": DOCS[0]}) + "\n{not json\n")
    msg = prepare_error(data_cfg(path), tok)
    assert "d.jsonl:2" in msg and "not valid JSON" in msg


def test_parquet_without_text_column(tmp_path, data_cfg, tok):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": DOCS}), path)
    msg = prepare_error(data_cfg(path), tok)
    assert 'no "text" column' in msg and "content" in msg and "Rename" in msg


def test_corrupt_parquet(tmp_path, data_cfg, tok):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"this is not parquet")
    assert "could not be read as parquet" in prepare_error(data_cfg(path), tok)


def test_non_positive_corpus_size(data_cfg, tok):
    assert "data.corpus_mb" in prepare_error(data_cfg(None, corpus_mb=0), tok)


def test_split_smaller_than_one_batch(tmp_path):
    shards = make_shard_dir(tmp_path / "s", {"train": 100, "val": 30})
    with pytest.raises(DataError) as err:
        TokenLoader(shards, "train", seq_len=32, batch_size=4, seed=0)
    msg = str(err.value)
    assert "has 100 tokens" in msg and "needs 129" in msg
    assert "data.seq_len" in msg and "data.batch_size" in msg and "more data" in msg
    with pytest.raises(DataError, match="data.val_fraction"):
        TokenLoader(shards, "val", seq_len=8, batch_size=4, seed=0)
    with pytest.raises(DataError, match=r"needs 257 .* 2 rank"):  # two ranks need twice as much
        TokenLoader(shards, "train", seq_len=32, batch_size=4, seed=0, rank=1, world_size=2)


def test_loader_on_a_directory_that_was_not_prepared(tmp_path):
    with pytest.raises(DataError, match="prepare"):
        TokenLoader(tmp_path, "train", seq_len=8, batch_size=2, seed=0)


def test_binary_file_named_txt_is_refused(tmp_path, data_cfg, tok):
    root = tmp_path / "d"
    root.mkdir()
    (root / "good.txt").write_text("plain text " * 50)
    (root / "model.txt").write_bytes(bytes(range(256)) * 40)  # a binary file, NUL bytes included
    msg = prepare_error(data_cfg(root), tok)
    assert "model.txt holds 40 NUL bytes" in msg and "binary" in msg


def test_text_mostly_invalid_utf8_is_refused_and_a_few_bad_bytes_are_counted(tmp_path, data_cfg,
                                                                             tok, caplog):
    root = tmp_path / "d"
    root.mkdir()
    (root / "latin1.txt").write_bytes("déjà vu, façade, naïve ".encode("latin-1") * 40)
    msg = prepare_error(data_cfg(root), tok)
    assert "latin1.txt is not UTF-8 text: 160 of its" in msg and "iconv" in msg
    (root / "latin1.txt").write_bytes(("plain text " * 200).encode() + b"\xff\xfe")
    with caplog.at_level("WARNING"):
        prepare(data_cfg(root), tok)
    assert "latin1.txt: 2 invalid UTF-8 bytes replaced" in caplog.text
