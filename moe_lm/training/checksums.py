"""Content checksums of checkpoint files: xxHash3-128 of each whole file, split over the ranks.

torch.distributed.checkpoint records where each tensor lies in its `.distcp` files (offsets and
lengths in `.metadata`) but no checksum of the bytes, so a bit flip of the same size loads without a
word. A checkpoint's `meta.json` therefore records `{"size": bytes, "xxh3_128": hex}` per file; the
digest is computed at save and compared before a resume and before any tool loads the weights.

Hashing is split over the ranks (file i goes to rank i mod world size, read from the shared
filesystem that DCP already requires) and the results gathered, so a large checkpoint is hashed in
parallel; one process hashes everything itself.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
import xxhash

from moe_lm.training import distributed as dist_utils

ALGORITHM = "xxh3_128"
READ_BYTES = 8 * 1024 * 1024


def file_digest(path: Path) -> str:
    """The xxHash3-128 hex digest of a file's bytes, read in blocks (constant memory).

    An unreadable file gets a text that matches no digest (the other ranks must not wait on a
    rank that raised)."""
    h = xxhash.xxh3_128()
    try:
        with open(path, "rb") as f:
            while block := f.read(READ_BYTES):
                h.update(block)
    except OSError as err:
        return f"unreadable ({err.strerror})"
    return h.hexdigest()


def digests(directory: Path, names: list[str]) -> dict[str, str]:
    """`{name: digest}` of the named files of `directory`; every rank calls this (collective).

    Each rank hashes its share of the files; all ranks get the whole dict.
    """
    names = sorted(names)
    mine = {n: file_digest(directory / n) for i, n in enumerate(names)
            if i % dist_utils.world_size() == dist_utils.rank()}
    if not dist_utils.is_initialized():
        return mine
    parts: list[dict[str, str] | None] = [None] * dist_utils.world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in (part or {}).items()}


def mismatches(directory: Path, files: dict[str, dict]) -> list[str]:
    """The names (of `files`, as recorded in meta.json) whose content digest differs now.

    Collective like `digests`. Entries without a digest (checkpoints written before checksums)
    are not compared.
    """
    recorded = {n: e[ALGORITHM] for n, e in files.items() if isinstance(e, dict) and ALGORITHM in e}
    now = digests(directory, list(recorded))
    return [n for n in sorted(recorded) if now.get(n) != recorded[n]]
