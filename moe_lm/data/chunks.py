"""Units of work of the prepare step: a source cut into chunks of about `data.chunk_mb` megabytes.

A chunk is a list of parts, each a whole file or a piece of one large file: a byte range of an
uncompressed .jsonl (the lines that begin in it) or a range of row groups of a .parquet. Small
files are grouped, in path order, until a chunk holds `chunk_mb`; compressed files and text files
are never split (a gzip / zstd stream is read from its start; a .txt is one document). The cut
depends only on the files and `chunk_mb`, never on the number of workers, so every layout of
workers tokenizes the same chunks into the same shards. Concatenating the documents of all chunks,
in order, gives exactly `Source.documents()`.

The built-in corpus is one chunk (it is small and capped by bytes across its files).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from moe_lm.data.corpus import (MB, Source, file_format, is_compressed, parquet_file,
                                read_jsonl, read_parquet, read_text_file)
from moe_lm.errors import DataError


@dataclass(frozen=True)
class Part:
    """One file, or the `[start, end)` byte range (jsonl) / row groups (parquet) of one."""

    path: Path
    start: int = 0
    end: Optional[int] = None  # None: to the end of the file
    nbytes: int = 0  # on-disk bytes this part covers (for progress and ETA)


@dataclass(frozen=True)
class Chunk:
    """The parts one task tokenizes into its own shard files; `index` orders the shards."""

    index: int
    parts: tuple[Part, ...]

    @property
    def nbytes(self) -> int:
        """On-disk bytes of the chunk's parts."""
        return sum(p.nbytes for p in self.parts)


def plan_chunks(source: Source, chunk_mb: float) -> list[Chunk]:
    """Cuts `source` into chunks of about `chunk_mb` megabytes, in document order."""
    if chunk_mb <= 0:
        raise DataError(f"data.chunk_mb={chunk_mb}: the prepare step cuts the data into chunks "
                        "of that many megabytes; set a positive size (the default is 32).")
    if source.kind == "builtin":
        size = source.byte_cap or sum(p.stat().st_size for p in source.files)
        return [Chunk(0, (Part(Path("<builtin>"), nbytes=size),))]
    target = int(chunk_mb * MB)
    chunks: list[Chunk] = []
    group: list[Part] = []

    def flush() -> None:
        if group:
            chunks.append(Chunk(len(chunks), tuple(group)))
            group.clear()

    for path in source.files:
        size = path.stat().st_size
        for part in _split_file(path, size, target):
            if part.nbytes >= target:  # a full piece of a large file: a chunk of its own
                flush()
                group.append(part)
                flush()
                continue
            group.append(part)
            if sum(p.nbytes for p in group) >= target:
                flush()
    flush()
    return chunks


def _split_file(path: Path, size: int, target: int) -> list[Part]:
    kind = file_format(path)
    if size <= target or kind == "text" or is_compressed(path):
        return [Part(path, nbytes=size)]
    if kind == "jsonl":
        cuts = list(range(0, size, target))
        return [Part(path, a, min(a + target, size), min(a + target, size) - a) for a in cuts]
    pf = parquet_file(path)  # parquet: consecutive row groups up to `target` bytes
    parts, first, acc = [], 0, 0
    for g in range(pf.num_row_groups):
        acc += pf.metadata.row_group(g).total_byte_size
        if acc >= target:
            parts.append(Part(path, first, g + 1, acc))
            first, acc = g + 1, 0
    if first < pf.num_row_groups:
        parts.append(Part(path, first, pf.num_row_groups, acc))
    return parts


def chunk_documents(source: Source, chunk: Chunk) -> Iterator[str]:
    """The chunk's non-blank documents, in order."""
    if source.kind == "builtin":
        yield from source.documents()
        return
    for part in chunk.parts:
        kind = file_format(part.path)
        if kind == "text":
            docs: Iterator[str] = iter([read_text_file(part.path)])  # refuses binary files
        elif kind == "jsonl":
            docs = read_jsonl(part.path, part.start, part.end)
        else:
            docs = read_parquet(part.path, part.start, part.end)
        for doc in docs:
            if doc.strip():
                yield doc

