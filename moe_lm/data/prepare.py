"""The prepare step: documents -> uint32 token shards with a held-out validation split, cached.

Layout of a prepared directory (`<cache_dir>/tokens/<tokenizer>-<fingerprint[:16]>/`):

    train_00000_000.bin, ...   raw little-endian uint32 token ids (numpy .tofile), per chunk
    val_00000_000.bin, ...
    chunks/chunk_00000.json    what each chunk held (documents, tokens, bytes, seconds)
    meta.json                  tokenizer, token counts, shards in stream order, source, fingerprint

The source is cut into chunks of about `data.chunk_mb` megabytes (`moe_lm.data.chunks`); each
chunk is tokenized on its own, by one task, into its own shard files, so chunks run in parallel
(the datatrove engine of `moe_lm.data.engine`, or one after another inside the training run: the
same `write_chunk`) and the shards do not depend on how many workers made them. Every document is
followed by the tokenizer's end-of-text id, so a split's stream reads `doc EOT doc EOT ...`. The
validation split is chosen by document inside each chunk: `round(n * val_fraction)` of its n
documents (at least one, and at least one left for training), spread evenly; a chunk with a single
document gives its last `val_fraction` of tokens instead.

The directory is keyed by a fingerprint of what determines its content (the source files' paths,
sizes and mtimes, the tokenizer, val_fraction, chunk_mb and, for the built-in corpus, corpus_mb).
Chunks are written into `.partial-<name>/`, each recorded by its `chunks/chunk_NNNNN.json` only once
its shards are on disk: a killed prepare keeps the finished chunks and the next one continues with
the rest. When all are done, meta.json is written and the directory is renamed into place, so a
published directory is never half-written; a file lock makes concurrent prepares (several ranks on
one machine) build it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from moe_lm.config import DataConfig
from moe_lm.data.chunks import Chunk, chunk_documents, plan_chunks
from moe_lm.data.corpus import Source, open_source
from moe_lm.data.tokenizer import Tokenizer
from moe_lm.errors import DataError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
SHARD_TOKENS = 1 << 27  # 128M tokens (512 MB) per shard file
ENCODE_BYTES = 4 * 1024 * 1024  # text handed to the tokenizer at once
TOKEN_DTYPE = np.uint32
SPLITS = ("train", "val")


@dataclass
class Plan:
    """What one prepared directory is made of; picklable, so engine tasks receive it whole."""

    cfg: DataConfig
    tokenizer: dict  # name, n_vocab, eot_id, source (as in meta.json)
    source: Source
    chunks: list[Chunk]
    fingerprint: str
    final: Path  # the published directory

    @property
    def partial(self) -> Path:
        """Where the chunks are written until the directory is published."""
        return self.final.parent / f".partial-{self.final.name}"

    @property
    def done(self) -> bool:
        """Whether the directory is published (its meta.json exists)."""
        return (self.final / "meta.json").is_file()

    def marker(self, index: int) -> Path:
        """The record of chunk `index`, written once its shards are complete."""
        return self.partial / "chunks" / f"chunk_{index:05d}.json"


def plan_prepare(cfg: DataConfig, tokenizer: Tokenizer) -> Plan:
    """The source, its chunks and the directory they go to; DataError for unusable data."""
    if cfg.sources:
        raise DataError("data.sources is a mixture: each source is prepared on its own "
                        "(moe_lm.data.mixture.prepare_sources, or python -m moe_lm.prepare).")
    source = open_source(cfg.path, cfg.corpus_mb)
    fp = fingerprint(source, tokenizer, cfg.val_fraction, cfg.chunk_mb)
    final = Path(os.path.expanduser(cfg.cache_dir)) / "tokens" / f"{tokenizer.name}-{fp[:16]}"
    # A published directory needs no chunks (planning reads every parquet file's metadata).
    chunks = [] if (final / "meta.json").is_file() else plan_chunks(source, cfg.chunk_mb)
    tok_meta = {"name": tokenizer.name, "n_vocab": tokenizer.n_vocab,
                "eot_id": tokenizer.eot_id, "source": tokenizer.source}
    return Plan(cfg, tok_meta, source, chunks, fp, final)


RunChunks = Callable[[Plan, Tokenizer], None]


def prepare(cfg: DataConfig, tokenizer: Tokenizer, run_chunks: Optional[RunChunks] = None) -> Path:
    """Tokenizes `cfg.path` (or the built-in corpus) into shards; returns the shard directory.

    Re-uses the cached directory when the fingerprint matches, so only the first call pays for
    tokenization. `run_chunks(plan, tokenizer)` writes the chunks (default: one after another in
    this process; `moe_lm.data.engine` runs them on datatrove). Raises DataError, saying what to
    change, for missing, empty or unreadable data.
    """
    plan = plan_prepare(cfg, tokenizer)
    if plan.done:
        log.info("using cached tokens in %s", plan.final)
        return plan.final
    plan.final.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(plan.final.parent / f".{plan.final.name}.lock"):
        if plan.done:  # another process built it while we waited
            return plan.final
        start_partial(plan)
        (run_chunks or run_in_process)(plan, tokenizer)
        meta = publish(plan)
    log.info("prepared %s train / %s val tokens in %.1fs -> %s", meta["train_tokens"],
             meta["val_tokens"], meta["seconds"], plan.final)
    return plan.final


def run_in_process(plan: Plan, tokenizer: Tokenizer) -> None:
    """Writes every chunk not written yet, in order, in this process."""
    for chunk in plan.chunks:
        write_chunk(plan, chunk.index, tokenizer)


def start_partial(plan: Plan) -> None:
    """Creates (or re-opens, to continue) the partial directory of `plan`."""
    for stale in plan.final.parent.glob(f".tmp-{plan.final.name}-*"):  # format 1's temp dirs
        shutil.rmtree(stale, ignore_errors=True)
    (plan.partial / "chunks").mkdir(parents=True, exist_ok=True)
    record = plan.partial / "plan.json"
    if record.is_file() and json.loads(record.read_text()).get("fingerprint") != plan.fingerprint:
        shutil.rmtree(plan.partial)  # same short name, other content: start over
        (plan.partial / "chunks").mkdir(parents=True)
    _write_json(record, {"fingerprint": plan.fingerprint, "chunks": len(plan.chunks)})


def fingerprint(source: Source, tokenizer: Tokenizer, val_fraction: float,
                chunk_mb: float) -> str:
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
        "chunk_mb": float(chunk_mb),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def load_meta(shard_dir: str | os.PathLike) -> dict:
    """meta.json of a prepared directory; DataError if the directory is not one."""
    path = Path(shard_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{shard_dir} holds no prepared tokens (no meta.json). Run "
                        "python -m moe_lm.prepare (or moe_lm.data.prepare(cfg.data, tokenizer)) "
                        "first and pass the directory it makes.")
    return json.loads(path.read_text())


def write_chunk(plan: Plan, index: int, tokenizer: Tokenizer) -> dict:
    """Tokenizes chunk `index` into its shard files and records it; skipped when recorded."""
    marker = plan.marker(index)
    if marker.is_file():
        return json.loads(marker.read_text())
    start = time.perf_counter()
    stream, lengths = _encode(chunk_documents(plan.source, plan.chunks[index]), tokenizer)
    n, eot, frac = len(lengths), tokenizer.eot_id, plan.cfg.val_fraction
    out: dict[str, np.ndarray] = {}
    docs = {"train": 0, "val": 0}
    if n == 0:  # blank chunk: no shards (publish reports a source without any text)
        pass
    elif n == 1:  # one document: its tail is the validation split
        cut = len(stream) - max(1, round(len(stream) * frac))
        out = {"train": np.append(stream[:cut], eot), "val": np.append(stream[cut:], eot)}
        docs = {"train": 1, "val": 1}
    else:
        ends = np.cumsum(lengths)
        with_eot = np.insert(stream, ends, eot).astype(TOKEN_DTYPE)  # doc EOT doc EOT ...
        is_val = np.zeros(n, dtype=bool)
        is_val[sorted(val_document_indices(n, frac))] = True
        mask = np.repeat(is_val, np.asarray(lengths) + 1)
        out = {"train": with_eot[~mask], "val": with_eot[mask]}
        docs = {"train": int(n - is_val.sum()), "val": int(is_val.sum())}
    shards = {}
    for split in SPLITS:
        stem = f"{split}_{index:05d}"
        for old in plan.partial.glob(f"{stem}_*.bin"):  # left by a killed attempt at this chunk
            old.unlink()
        writer = ShardWriter(plan.partial, split, stem=stem)
        if n:
            writer.write(out[split])
        shards[split] = writer.close()
    record = {"index": index, "documents": {"total": n, **docs},
              "shards": shards, "bytes": plan.chunks[index].nbytes,
              "seconds": round(time.perf_counter() - start, 3)}
    _write_json(marker, record)
    return record


def publish(plan: Plan) -> dict:
    """Writes meta.json from the chunk records and renames the directory into place."""
    missing = [c.index for c in plan.chunks if not plan.marker(c.index).is_file()]
    if missing:
        raise DataError(
            f"The prepare of {plan.source.description} is unfinished: {len(missing)} of "
            f"{len(plan.chunks)} chunks are not written (first: {missing[:5]}). Run the same "
            "python -m moe_lm.prepare command again: it continues with the missing chunks.")
    records = [json.loads(plan.marker(c.index).read_text()) for c in plan.chunks]
    docs = {k: sum(r["documents"][k] for r in records) for k in ("total",) + SPLITS}
    if docs["total"] == 0:
        raise DataError(
            f"No text found in {plan.source.description} ({len(plan.source.files)} file(s), all "
            "empty or blank). Put documents in the files, or point data.path at other data."
        )
    shards = {split: [s for r in records for s in r["shards"][split] if s["tokens"] > 0]
              for split in SPLITS}
    counts = {split: sum(s["tokens"] for s in shards[split]) for split in SPLITS}
    source = plan.source
    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer": plan.tokenizer,
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "source": {"description": source.description, "kind": source.kind,
                   "n_files": len(source.files), "extra": source.extra},
        "documents": docs,
        "val_fraction": float(plan.cfg.val_fraction),
        "chunk_mb": float(plan.cfg.chunk_mb),
        "chunks": len(records),
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "shards": shards,
        "seconds": round(sum(r["seconds"] for r in records), 3),
        "fingerprint": plan.fingerprint,
    }
    _write_json(plan.partial / "meta.json", meta)
    (plan.partial / "plan.json").unlink(missing_ok=True)
    if plan.final.exists():  # a directory without meta.json: not ours to trust
        shutil.rmtree(plan.final)
    os.rename(plan.partial, plan.final)
    return meta


def _encode(documents, tokenizer: Tokenizer) -> tuple[np.ndarray, list[int]]:
    """All token ids of `documents` as one uint32 array, and each document's length."""
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    batch: list[str] = []
    size = 0

    def flush() -> None:
        for ids in tokenizer.encode_batch(batch):
            pieces.append(np.asarray(ids, dtype=TOKEN_DTYPE))
            lengths.append(len(ids))
        batch.clear()

    for doc in documents:
        batch.append(doc)
        size += len(doc)
        if size >= ENCODE_BYTES:
            flush()
            size = 0
    if batch:
        flush()
    stream = np.concatenate(pieces) if pieces else np.empty(0, dtype=TOKEN_DTYPE)
    return stream, lengths


def val_document_indices(n_docs: int, val_fraction: float) -> set[int]:
    """Indices of the validation documents: evenly spread, >= 1, and never all of them."""
    if n_docs < 2:
        return set()
    n_val = min(n_docs - 1, max(1, round(n_docs * val_fraction)))
    return {int((j + 0.5) * n_docs / n_val) for j in range(n_val)}


class ShardWriter:
    """Appends token ids to `<stem>_NNN.bin` files of at most `max_tokens` tokens each
    (`stem` defaults to the split's name)."""

    def __init__(self, out_dir: Path, split: str, max_tokens: int = SHARD_TOKENS,
                 stem: Optional[str] = None):
        self.out_dir, self.split, self.max_tokens = out_dir, split, max_tokens
        self.stem = stem or split
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
        name = f"{self.stem}_{len(self.shards):03d}.bin"
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


def _write_json(path: Path, obj: dict) -> None:
    """Writes `path` whole or not at all (a temp file renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Holds an exclusive file lock (a no-op where fcntl is missing).

    A POSIX record lock (lockf), not flock: forked children (datatrove's worker pool and manager)
    do not inherit it, so a killed prepare whose children outlive it never blocks the next one.
    """
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone keeps the cache consistent
        yield
        return
    with open(lock_path, "w") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)
