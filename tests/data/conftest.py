"""Fixtures for the data tests: one shared tokenizer, small configs, hand-made shard directories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moe_lm.config import DataConfig
from moe_lm.data.prepare import ShardWriter
from moe_lm.data.tokenizer import get_tokenizer

# Short real documents (English prose and code, as the built-in corpus holds).
DOCS = [
    "The quick brown fox jumps over the lazy dog.\nIt was not amused.",
    "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n",
    "Errors should never pass silently. Unless explicitly silenced.",
    "In the face of ambiguity, refuse the temptation to guess.",
    "Zoë's café serves crème brûlée — and naïve coffee ☕.",
    "A literal <|endoftext|> inside a document is just text, not a boundary.",
    "Namespaces are one honking great idea -- let's do more of those!",
    "Readability counts. Special cases aren't special enough to break the rules.",
]


@pytest.fixture(scope="session")
def tok():
    return get_tokenizer("cl100k_base")


@pytest.fixture
def data_cfg(tmp_path):
    """Returns a factory of DataConfigs whose cache lives in this test's tmp_path."""

    def make(path=None, **kw) -> DataConfig:
        kw.setdefault("val_fraction", 0.25)
        kw.setdefault("cache_dir", str(tmp_path / "cache"))
        return DataConfig(path=None if path is None else str(path), **kw)

    return make


def read_split(shard_dir: Path, split: str) -> np.ndarray:
    """The whole token stream of a split, shards concatenated."""
    meta = json.loads((shard_dir / "meta.json").read_text())
    parts = [np.fromfile(shard_dir / s["file"], dtype=np.uint32) for s in meta["shards"][split]]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint32)


def split_docs(stream: np.ndarray, eot: int) -> list[list[int]]:
    """Splits a `doc EOT doc EOT` stream into documents; asserts it ends with EOT."""
    assert stream.size and stream[-1] == eot
    docs, cur = [], []
    for t in stream.tolist():
        if t == eot:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    return docs


def make_shard_dir(root: Path, tokens: dict[str, int], shard_tokens: int = 1 << 27) -> Path:
    """A prepared-style directory whose split streams are 0, 1, 2, ... (each token its position).

    With every token distinct, a window's first token names the window, so tests can check which
    windows a loader served.
    """
    root.mkdir(parents=True, exist_ok=True)
    shards = {}
    for split, n in tokens.items():
        writer = ShardWriter(root, split, max_tokens=shard_tokens)
        writer.write(list(range(n)))
        shards[split] = writer.close()
    meta = {"shards": shards, **{f"{s}_tokens": n for s, n in tokens.items()}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root
