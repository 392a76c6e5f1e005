"""How long `python -m moe_lm.prepare` takes for the run's tokens, from a rate measured now.

The rate is measured on the fly: about `SAMPLE_MB` of the run's own text (the first documents of
`data.path` or of each `data.sources` path; the built-in corpus when the data is not on this
machine) goes as one jsonl chunk through the very step a prepare worker runs on each chunk
(`write_chunk`: read, tokenize with the run's tokenizer, split, write the shards), in a temporary
directory, timed in CPU seconds of this one process. The chunks are independent datatrove tasks,
so N workers (one core each) prepare at N times that rate while storage keeps up.
experiments/results/prepare_throughput_2026-12-02.md holds the full measurement: whole prepares,
in-process and with datatrove's 1 and 2 workers, the command and the versions.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from moe_lm.config import TrainConfig
from moe_lm.data.corpus import builtin_source, open_source
from moe_lm.data.prepare import plan_prepare, start_partial, write_chunk
from moe_lm.data.tokenizer import get_tokenizer
from moe_lm.errors import DataError

SAMPLE_MB = 1.0
SLURM_TASKS = 1000  # the cluster run the plan also prices (README: "Data at scale")


def _sample(cfg: TrainConfig, nbytes: int) -> tuple[list[str], str]:
    """About `nbytes` of the run's documents, and where they come from."""
    paths = [s.path for s in cfg.data.sources] or [cfg.data.path]
    per_path = nbytes // len(paths)
    docs: list[str] = []
    try:
        for path in paths:
            docs += _take(open_source(path, cfg.data.corpus_mb).documents(), per_path)
        where = "the run's data" if cfg.data.path or cfg.data.sources else "the built-in corpus"
    except DataError:  # not on this machine (a cluster path): real text of the same kind
        docs = _take(builtin_source(2 * SAMPLE_MB).documents(), nbytes)
        where = "the built-in corpus (the run's data is not readable here)"
    return docs, where


def _take(docs: Iterator[str], nbytes: int) -> list[str]:
    out, size = [], 0
    for doc in docs:
        out.append(doc)
        size += len(doc.encode())
        if size >= nbytes:
            break
    return out


def prepare_estimate(cfg: TrainConfig, tokens: int) -> dict[str, Any]:
    """The measured per-worker rate and the time to prepare `tokens` tokens with 1 worker,
    `prepare.workers` workers and `SLURM_TASKS` SLURM tasks (or `prepare.tasks`)."""
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    docs, where = _sample(cfg, int(SAMPLE_MB * 1e6))
    with tempfile.TemporaryDirectory(prefix="moe_lm_plan_") as tmp:
        path = Path(tmp) / "sample.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        data = replace(cfg.data, path=str(path), sources=[], cache_dir=tmp,
                       chunk_mb=2 * SAMPLE_MB + path.stat().st_size / 1e6)  # one chunk
        plan = plan_prepare(data, tokenizer)
        start_partial(plan)
        start = time.process_time()
        record = write_chunk(plan, 0, tokenizer)
        cpu_s = max(time.process_time() - start, 1e-6)
    n_tokens = sum(s["tokens"] for split in record["shards"].values() for s in split)
    rate = n_tokens / cpu_s
    worker_s = tokens / rate
    p = cfg.prepare
    workers = max(1, p.workers)  # moe_lm.prepare itself refuses workers < 1
    tasks = p.tasks if p.executor == "slurm" and p.tasks > 0 else SLURM_TASKS
    return {"tokens": tokens, "tokens_per_worker_s": rate, "worker_hours": worker_s / 3600,
            "sample": {"where": where, "bytes": sum(len(d.encode()) for d in docs),
                       "tokens": n_tokens, "cpu_s": cpu_s, "tokenizer": tokenizer.name},
            "seconds": {"1": worker_s, str(workers): worker_s / workers,
                        f"slurm_{tasks}": worker_s / tasks}}
