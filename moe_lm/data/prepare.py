"""The prepare step: documents -> uint32 token shards with a held-out validation split, cached.

Layout of a prepared directory (`<cache_dir>/tokens/<tokenizer>-<fingerprint[:16]>/`):

    train_000.bin, train_001.bin, ...   raw little-endian uint32 token ids (numpy .tofile)
    val_000.bin, ...
    meta.json                           tokenizer, token counts, shards, source, fingerprint

Every document is followed by the tokenizer's end-of-text id, so the concatenated stream of a split
reads `doc EOT doc EOT ...`. The validation split is chosen by document: `round(n * val_fraction)`
documents (at least one, and at least one left for training), spread evenly over the corpus order,
so it is the same on every machine. A source with a single document is split by tokens instead:
its last `val_fraction` of tokens are the validation split.

The directory is keyed by a fingerprint of what determines its content (the source files' paths,
sizes and mtimes, the tokenizer, val_fraction and, for the built-in corpus, corpus_mb). It is built
in a temporary directory and renamed into place, so a killed prepare never leaves a half-written
cache; a file lock makes concurrent prepares (several ranks on one machine) build it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from moe_lm.config import DataConfig
from moe_lm.data.corpus import Source, open_source
from moe_lm.data.tokenizer import Tokenizer
from moe_lm.errors import DataError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SHARD_TOKENS = 1 << 27  # 128M tokens (512 MB) per shard file
CHUNK_BYTES = 4 * 1024 * 1024  # text handed to the tokenizer at once
TOKEN_DTYPE = np.uint32
SPLITS = ("train", "val")


def prepare(cfg: DataConfig, tokenizer: Tokenizer) -> Path:
    """Tokenizes `cfg.path` (or the built-in corpus) into shards; returns the shard directory.

    Re-uses the cached directory when the fingerprint matches, so only the first call pays for
    tokenization. Raises DataError, saying what to change, for missing, empty or unreadable data.
    """
    source = open_source(cfg.path, cfg.corpus_mb)
    fp = fingerprint(source, tokenizer, cfg.val_fraction)
    root = Path(os.path.expanduser(cfg.cache_dir)) / "tokens"
    final = root / f"{tokenizer.name}-{fp[:16]}"
    if (final / "meta.json").is_file():
        log.info("using cached tokens in %s", final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{final.name}.lock"):
        if (final / "meta.json").is_file():  # another process built it while we waited
            return final
        for stale in root.glob(f".tmp-{final.name}-*"):  # left by a killed prepare
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
        try:
            meta = write_shards(tmp, source, tokenizer, cfg.val_fraction)
            meta["fingerprint"] = fp
            _write_json(tmp / "meta.json", meta)
            if final.exists():  # a directory without meta.json: not ours to trust
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("prepared %s train / %s val tokens in %.1fs -> %s", meta["train_tokens"],
             meta["val_tokens"], meta["seconds"], final)
    return final


def fingerprint(source: Source, tokenizer: Tokenizer, val_fraction: float) -> str:
    """sha256 of everything that determines the shards' content."""
    files = []
    for path in source.files:
        st = path.stat()
        files.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    key = {
        "format_version": FORMAT_VERSION,
        "source": source.kind,
        "files": files,
        "extra": source.extra,
        "tokenizer": [tokenizer.name, tokenizer.n_vocab, tokenizer.eot_id],
        "val_fraction": float(val_fraction),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def load_meta(shard_dir: str | os.PathLike) -> dict:
    """meta.json of a prepared directory; DataError if the directory is not one."""
    path = Path(shard_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{shard_dir} holds no prepared tokens (no meta.json). Run "
                        "moe_lm.data.prepare(cfg.data, tokenizer) first and pass the directory "
                        "it returns.")
    return json.loads(path.read_text())


def write_shards(out_dir: Path, source: Source, tokenizer: Tokenizer,
                 val_fraction: float) -> dict:
    """Tokenizes `source` into `out_dir`; returns the meta dict (without the fingerprint)."""
    start = time.perf_counter()
    n_docs = sum(1 for _ in source.documents())  # pass 1: count, to place the val documents
    if n_docs == 0:
        raise DataError(
            f"No text found in {source.description} ({len(source.files)} file(s), all empty or "
            "blank). Put documents in the files, or point data.path at other data."
        )
    val_docs = val_document_indices(n_docs, val_fraction)
    writers = {split: ShardWriter(out_dir, split) for split in SPLITS}
    docs_per_split = {split: 0 for split in SPLITS}
    eot = tokenizer.eot_id
    for first_index, ids_list in _encoded_chunks(source, tokenizer):
        for offset, ids in enumerate(ids_list):
            index = first_index + offset
            if n_docs == 1:  # one document: its tail is the validation split
                cut = len(ids) - max(1, round(len(ids) * val_fraction))
                writers["train"].write(ids[:cut] + [eot])
                writers["val"].write(ids[cut:] + [eot])
                docs_per_split["train"] += 1
                docs_per_split["val"] += 1
                continue
            split = "val" if index in val_docs else "train"
            writers[split].write(ids + [eot])
            docs_per_split[split] += 1
    shards = {split: writers[split].close() for split in SPLITS}
    counts = {split: sum(s["tokens"] for s in shards[split]) for split in SPLITS}
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"name": tokenizer.name, "n_vocab": tokenizer.n_vocab,
                      "eot_id": tokenizer.eot_id, "source": tokenizer.source},
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "source": {"description": source.description, "kind": source.kind,
                   "n_files": len(source.files), "extra": source.extra},
        "documents": {"total": n_docs, **docs_per_split},
        "val_fraction": float(val_fraction),
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "shards": shards,
        "seconds": round(time.perf_counter() - start, 3),
    }


def val_document_indices(n_docs: int, val_fraction: float) -> set[int]:
    """Indices of the validation documents: evenly spread, >= 1, and never all of them."""
    if n_docs < 2:
        return set()
    n_val = min(n_docs - 1, max(1, round(n_docs * val_fraction)))
    return {int((j + 0.5) * n_docs / n_val) for j in range(n_val)}


class ShardWriter:
    """Appends token ids to `<split>_NNN.bin` files of at most `max_tokens` tokens each."""

    def __init__(self, out_dir: Path, split: str, max_tokens: int = SHARD_TOKENS):
        self.out_dir, self.split, self.max_tokens = out_dir, split, max_tokens
        self.shards: list[dict] = []
        self._file = None
        self._in_shard = 0

    def write(self, ids: list[int]) -> None:
        """Appends `ids`, starting a new shard file whenever the current one is full."""
        arr = np.asarray(ids, dtype=TOKEN_DTYPE)
        while arr.size:
            if self._file is None or self._in_shard == self.max_tokens:
                self._open_next()
            take = min(arr.size, self.max_tokens - self._in_shard)
            arr[:take].tofile(self._file)
            self._in_shard += take
            self.shards[-1]["tokens"] += take
            arr = arr[take:]

    def _open_next(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._file = open(self.out_dir / name, "wb")
        self._in_shard = 0
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> list[dict]:
        """Flushes to disk and returns [{"file", "tokens"}] for meta.json."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        return self.shards


def _encoded_chunks(source: Source, tokenizer: Tokenizer) -> Iterator[tuple[int, list[list[int]]]]:
    """(index of the first document, token ids of each document) for chunks of ~4 MB of text."""
    chunk: list[str] = []
    size = 0
    first = 0
    for doc in source.documents():
        chunk.append(doc)
        size += len(doc)
        if size >= CHUNK_BYTES:
            yield first, tokenizer.encode_batch(chunk)
            first += len(chunk)
            chunk, size = [], 0
    if chunk:
        yield first, tokenizer.encode_batch(chunk)


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Holds an exclusive file lock (POSIX flock; a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone keeps the cache consistent
        yield
        return
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
