"""Where documents come from: the built-in corpus and readers for the user's own files.

The built-in corpus is real human-written text that every machine with Python already has: the
reference documentation that ships with CPython (`pydoc_data.topics`, the text `help()` shows)
followed by the sources of the standard library (`.py` files under the stdlib path, without
site-packages, test suites and generated files such as codec tables), in a fixed order and capped
at `data.corpus_mb` megabytes (10**6 bytes of UTF-8). Nothing is generated or random.

User data (`data.path`) is a file or a directory searched recursively, in sorted path order:
- `.txt` / `.md`: one document per file;
- `.jsonl` (also gzip / zstd compressed: `.jsonl.gz`, `.jsonl.zst`): one JSON object per line with
  a string field "text", read as a stream;
- `.parquet`: a string column "text", one document per row (read with pyarrow, in row groups).

Every source is described by a `Source`: the files it reads (their paths, sizes and mtimes feed
the cache fingerprint) and a `documents()` generator of strings. Bad input raises DataError.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import logging
import os
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from moe_lm.errors import DataError

log = logging.getLogger(__name__)

TEXT_EXTS = (".txt", ".md")
MAX_REPLACED_SHARE = 0.01  # invalid UTF-8 in more of a text file's characters: not text
COMPRESSED_EXTS = (".jsonl.gz", ".jsonl.zst", ".jsonl.zstd")
SUPPORTED_EXTS = TEXT_EXTS + (".jsonl", ".parquet") + COMPRESSED_EXTS
MB = 1_000_000
# Directories of the stdlib that hold no hand-written library text.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
              "pydoc_data", "ensurepip"}
# A header line that marks a file as machine-written (codec tables, token lists, sysconfig data).
_GENERATED = re.compile(
    r"auto-?generated|automatically generated|generated (?:by|from) \S+\.py|gencodec\.py"
    r"|do not edit|don't edit",
    re.IGNORECASE,
)


@dataclass
class Source:
    """A set of documents and the files they are read from.

    `files` are the files that determine the content (for the cache fingerprint); `description`
    says in words what the source is (it goes into meta.json); `byte_cap` truncates the stream of
    documents after that many bytes of UTF-8 text (None: no cap).
    """

    description: str
    files: list[Path]
    kind: str  # "builtin" or "user"
    byte_cap: Optional[int] = None
    extra: dict = field(default_factory=dict)  # what else the fingerprint must cover

    def documents(self) -> Iterator[str]:
        """Yields the documents in order, skipping empty ones, truncated at `byte_cap`."""
        stream = _builtin_documents(self.files) if self.kind == "builtin" else _user_documents(
            self.files)
        budget = self.byte_cap
        for doc in stream:
            if not doc.strip():
                continue
            if budget is not None:
                size = len(doc.encode("utf-8"))
                if size >= budget:
                    doc = _truncate_utf8(doc, budget)
                    if doc.strip():
                        yield doc
                    return
                budget -= size
            yield doc


def open_source(path: Optional[str], corpus_mb: float) -> Source:
    """The Source for `data.path` (None: the built-in corpus of `corpus_mb` megabytes)."""
    if path is None or str(path).strip() == "":
        return builtin_source(corpus_mb)
    return user_source(path)


# --------------------------------------------------------------------------- built-in corpus


def builtin_source(corpus_mb: float) -> Source:
    """CPython's documentation and standard-library sources, the first `corpus_mb` megabytes."""
    if corpus_mb <= 0:
        raise DataError(f"data.corpus_mb={corpus_mb}: the built-in corpus needs a positive size "
                        "in megabytes (the default is 6), or point data.path at your own files.")
    cap = int(corpus_mb * MB)
    topics = _pydoc_topics_file()
    files: list[Path] = [topics] if topics is not None else []
    total = sum(len(t.encode("utf-8")) for t in _pydoc_topic_texts()) if topics else 0
    for path in stdlib_sources():
        if total >= cap:
            break
        files.append(path)
        total += path.stat().st_size
    if not files:
        raise DataError("The built-in corpus found no CPython documentation or stdlib sources on "
                        "this machine; point data.path at your own .txt/.md/.jsonl/.parquet files.")
    return Source(
        description=f"built-in corpus: CPython {sysconfig.get_python_version()} documentation "
                    f"(pydoc_data.topics) and stdlib sources, first {corpus_mb:g} MB",
        files=files, kind="builtin", byte_cap=cap, extra={"corpus_mb": corpus_mb},
    )


def stdlib_sources() -> list[Path]:
    """Hand-written `.py` files of the standard library, sorted by their path inside it."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames
                       if d not in _SKIP_DIRS and not d.startswith(("config-", "."))]
        for name in filenames:
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):
                continue
            path = Path(dirpath) / name
            if not _is_generated(path):
                found.append((path.relative_to(root).as_posix(), path))
    return [path for _, path in sorted(found)]


def _is_generated(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = b"".join(f.readline() for _ in range(12)).decode("utf-8", "replace")
    except OSError:
        return True
    return _GENERATED.search(head) is not None


def _pydoc_topics_file() -> Optional[Path]:
    try:
        import pydoc_data.topics as topics
    except ImportError:
        return None
    return Path(topics.__file__) if topics.__file__ else None


def _builtin_documents(files: list[Path]) -> Iterator[str]:
    for path in files:
        if path.parent.name == "pydoc_data":
            yield from _pydoc_topic_texts()
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def _pydoc_topic_texts() -> Iterator[str]:
    """The documentation topics (one document each, sorted by topic name) of pydoc_data."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def _truncate_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of whole lines of `text` that fits in `max_bytes` bytes of UTF-8."""
    cut = text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")
    newline = cut.rfind("\n")
    return cut[: newline + 1] if newline >= 0 else cut


# --------------------------------------------------------------------------- user files


def user_source(path: str) -> Source:
    """The user's file or directory of .txt/.md/.jsonl/.parquet files; DataError if unusable."""
    root = Path(os.path.expanduser(str(path)))
    if not root.exists():
        raise DataError(
            f"data.path={path!r} does not exist (resolved to {root.resolve()}). Point data.path "
            "at a file or directory of .txt/.md, .jsonl or .parquet files, or leave it unset "
            "(data.path=null) to use the built-in corpus."
        )
    if root.is_file():
        if file_format(root) is None:
            raise DataError(
                f"data.path={path!r} has the unsupported extension {root.suffix or '(none)'!r} "
                f"(an unknown source format). Supported: {', '.join(SUPPORTED_EXTS)} (.txt/.md: "
                "one document per file; .jsonl, plain or gzip/zstd-compressed: a \"text\" field "
                "per line; .parquet: a \"text\" column). Convert the file or rename it if it is "
                "plain text."
            )
        files = [root]
    else:
        files = sorted(
            (p for p in root.rglob("*")
             if p.is_file() and file_format(p) is not None
             and not any(part.startswith(".") for part in p.relative_to(root).parts)),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        if not files:
            others = sorted({p.suffix or p.name
                             for p in itertools.islice(root.rglob("*"), 10_000) if p.is_file()})
            seen = f" (it holds: {', '.join(others[:10])})" if others else " (it is empty)"
            raise DataError(
                f"data.path={path!r} is a directory with no supported files{seen}. Put .txt/.md "
                "(one document per file), .jsonl (a \"text\" field per line) or .parquet (a "
                "\"text\" column) files in it, or point data.path at another directory."
            )
    return Source(description=f"user data: {root.resolve()}", files=files, kind="user")


def file_format(path: Path) -> Optional[str]:
    """"text", "jsonl" (plain or compressed) or "parquet" by the file's name; None: unsupported."""
    name = path.name.lower()
    if name.endswith(COMPRESSED_EXTS) or name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text" if name.endswith(TEXT_EXTS) else None


def is_compressed(path: Path) -> bool:
    """Whether the file is a gzip / zstd stream (read from its start, never split)."""
    return path.name.lower().endswith(COMPRESSED_EXTS)


def _user_documents(files: list[Path]) -> Iterator[str]:
    for path in files:
        kind = file_format(path)
        if kind == "text":
            yield read_text_file(path)
        elif kind == "jsonl":
            yield from read_jsonl(path)
        elif kind == "parquet":
            yield from read_parquet(path)


def read_text_file(path: Path) -> str:
    """A .txt/.md document as UTF-8. A binary file (NUL bytes, or over MAX_REPLACED_SHARE of its
    characters not valid UTF-8) is refused rather than tokenized as noise; a few invalid bytes are
    replaced with a warning that counts them."""
    raw = path.read_bytes()
    nul = raw.count(b"\0")
    if nul:
        raise DataError(f"{path} holds {nul} NUL bytes: it is a binary file, not text. Remove it "
                        "from data.path (or convert it to UTF-8 text).")
    text = raw.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
    if replaced and replaced > MAX_REPLACED_SHARE * len(text):
        raise DataError(f"{path} is not UTF-8 text: {replaced} of its {len(text)} characters are "
                        "invalid UTF-8. Convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or "
                        "remove it from data.path.")
    if replaced:
        log.warning("%s: %d invalid UTF-8 bytes replaced with U+FFFD", path, replaced)
    return text


def open_binary(path: Path) -> io.BufferedIOBase:
    """The file's bytes, decompressed on the fly for .gz / .zst(d) (bounded memory)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        try:
            import zstandard
        except ImportError as exc:
            raise DataError(f"{path} is zstd-compressed, which needs the zstandard package: "
                            "pip install 'moe_lm[data]' (or pip install zstandard), or "
                            "decompress it (zstd -d).") from exc
        # read_across_frames: files made by concatenating zstd frames (pzstd, cat a.zst b.zst)
        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True,
                                                            read_across_frames=True)
        return io.BufferedReader(reader)
    return open(path, "rb")


def read_jsonl(path: Path, start: int = 0, end: Optional[int] = None) -> Iterator[str]:
    """The "text" field of each line of a JSON-lines file (blank lines are skipped).

    `start` / `end` read one byte range of an uncompressed file: the lines that begin in
    `[start, end)`, so consecutive ranges cover every line exactly once.
    """
    with open_binary(path) as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the rest of the line that began before `start`
        pos, lineno = f.tell(), 0
        for raw in iter(f.readline, b""):
            if end is not None and pos >= end:
                break
            lineno += 1
            where = lineno if start == 0 else f"byte {pos}"  # line numbers only from the top
            pos += len(raw)
            if raw.strip():
                yield _jsonl_text(raw, path, where)


def _jsonl_text(raw: bytes, path: Path, where) -> str:
    line = raw.decode("utf-8", errors="replace")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{where} is not valid JSON ({exc.msg}). Each line of a "
                        ".jsonl file must be one JSON object such as "
                        "{\"text\": \"...\"}; fix or remove that line.") from exc
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        keys = ", ".join(map(repr, record)) if isinstance(record, dict) else "none"
        raise DataError(
            f"{path}:{where} has no string field \"text\" (its keys: {keys}). Each line "
            "of a .jsonl file must be an object with the document in \"text\", e.g. "
            "{\"text\": \"...\"}; rename the field or convert the file."
        )
    return text


def parquet_file(path: Path):
    """The pyarrow ParquetFile, checked to hold a "text" column; DataError otherwise."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"{path} could not be read as parquet ({exc}). Check the file or "
                        "convert it to .jsonl with a \"text\" field.") from exc
    names = pf.schema_arrow.names
    if "text" not in names:
        raise DataError(
            f"{path} has no \"text\" column (its columns: {', '.join(names) or 'none'}). "
            "Rename the column holding the documents to \"text\"."
        )
    return pf


def read_parquet(path: Path, first_group: int = 0, end_group: Optional[int] = None
                 ) -> Iterator[str]:
    """The "text" column of a parquet file, one document per row (nulls are skipped); row
    groups `[first_group, end_group)` only, when given."""
    pf = parquet_file(path)
    stop = pf.num_row_groups if end_group is None else end_group
    for group in range(first_group, stop):
        column = pf.read_row_group(group, columns=["text"]).column("text")
        for value in column.to_pylist():
            if isinstance(value, str):
                yield value
