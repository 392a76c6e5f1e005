"""The prepare step on datatrove: chunks as tasks of its local (processes) or SLURM executor.

`python -m moe_lm.prepare` hands the chunks of `moe_lm.data.chunks` to datatrove
(`pip install 'moe_lm[data]'`): task t of T writes the chunks `t, t + T, t + 2T, ...` with the very
`write_chunk` the training run uses in-process, so the shards are the same whoever writes them.
datatrove runs the tasks (`prepare.workers` at once on this machine, or as a SLURM job array),
keeps their logs and statistics in `prepare.logging_dir`, and skips tasks it has completed; the
chunk records of `prepare.py` make a rerun also skip the finished chunks of a task that was killed
half-way. The last step, publishing meta.json and renaming the directory into place, runs here
(local) or as a one-task SLURM job that waits for the array (`depends`).

While the local executor works, a thread here reads the chunk records and shows a tqdm bar over
the source's bytes with documents/s and tokens/s (the rates of this session's chunks) and an ETA.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from moe_lm.config import DataConfig, PrepareConfig
from moe_lm.data.mixture import prepare_sources
from moe_lm.data.prepare import Plan, plan_prepare, prepare, publish, start_partial, write_chunk
from moe_lm.data.tokenizer import Tokenizer, get_tokenizer
from moe_lm.errors import ConfigError, DataError

try:  # datatrove is the optional extra `moe_lm[data]`; the training run does not need it
    from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
    from datatrove.pipeline.base import PipelineStep
    from tqdm import tqdm
except ImportError:  # pragma: no cover - exercised only without the extra
    LocalPipelineExecutor = SlurmPipelineExecutor = None
    PipelineStep = object
    tqdm = None

EXECUTORS = ("local", "slurm")


class TokenizeChunks(PipelineStep):
    """A datatrove step: task `rank` of `world_size` writes chunks `rank::world_size` of a plan."""

    name = "moe_lm tokenize"
    type = "Tokenizer"

    def __init__(self, plan: Plan):
        super().__init__()
        self.plan = plan

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        """Writes this task's chunks (those already recorded are skipped); yields no documents."""
        tokenizer = _tokenizer(self.plan.tokenizer["name"])
        for chunk in self.plan.chunks[rank::world_size]:
            record = write_chunk(self.plan, chunk.index, tokenizer)
            self.stat_update("documents", value=record["documents"]["total"], unit="chunk")
            self.stat_update("tokens", value=sum(s["tokens"] for split in record["shards"].values()
                                                 for s in split), unit="chunk")
        return iter(())


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str) -> Tokenizer:
    """One tokenizer per worker process: loading the BPE ranks costs more than a small task."""
    return get_tokenizer(name)


class PublishStep(PipelineStep):
    """A datatrove step (one task): publishes the prepared directory once every chunk is written."""

    name = "moe_lm publish"
    type = "Writer"

    def __init__(self, plan: Plan):
        super().__init__()
        self.plan = plan

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        """Writes meta.json and renames the directory into place (nothing if already done)."""
        if not self.plan.done:
            publish(self.plan)
        return iter(())


def check_engine(pcfg: PrepareConfig) -> None:
    """ConfigError for settings the engine cannot run; DataError when datatrove is missing."""
    if pcfg.executor not in EXECUTORS:
        raise ConfigError(f"prepare.executor={pcfg.executor!r}: choose local (processes on this "
                          "machine) or slurm (a SLURM job array).")
    if pcfg.workers < 1 or pcfg.tasks < 0:
        raise ConfigError(f"prepare.workers={pcfg.workers} must be >= 1 and prepare.tasks="
                          f"{pcfg.tasks} >= 0 (0: one task per chunk).")
    if pcfg.executor == "slurm" and not pcfg.slurm_partition:
        raise ConfigError("prepare.executor=slurm needs prepare.slurm_partition=<partition>.")
    if LocalPipelineExecutor is None:
        raise DataError("python -m moe_lm.prepare runs on datatrove, which is not installed: "
                        "pip install 'moe_lm[data]' (or pip install datatrove). The training run "
                        "itself prepares small corpora without it.")


def prepare_on_engine(cfg: DataConfig, tokenizer: Tokenizer, pcfg: PrepareConfig) -> Optional[Path]:
    """Prepares `cfg` with datatrove; returns the published directory (None: SLURM submitted)."""
    check_engine(pcfg)
    if pcfg.executor == "slurm":
        return submit_slurm(cfg, tokenizer, pcfg)
    return prepare(cfg, tokenizer, run_chunks=lambda plan, tok: run_local(plan, pcfg))


def _logging_dir(plan: Plan, pcfg: PrepareConfig) -> str:
    base = pcfg.logging_dir or os.path.join(os.path.expanduser(plan.cfg.cache_dir), "prepare_logs")
    return os.path.join(base, plan.final.name)


def _tasks(plan: Plan, pcfg: PrepareConfig) -> int:
    return min(pcfg.tasks or len(plan.chunks), len(plan.chunks))


def run_local(plan: Plan, pcfg: PrepareConfig) -> None:
    """Runs the plan's chunks as datatrove tasks on this machine, with a progress bar."""
    tasks = _tasks(plan, pcfg)
    executor = LocalPipelineExecutor(
        [TokenizeChunks(plan)], tasks=tasks, workers=min(pcfg.workers, tasks),
        logging_dir=_logging_dir(plan, pcfg), skip_completed=True)
    with Progress(plan):
        executor.run()


def submit_slurm(cfg: DataConfig, tokenizer: Tokenizer, pcfg: PrepareConfig) -> Optional[Path]:
    """Submits the chunks as a SLURM job array and the publish step as a job after it."""
    plan = plan_prepare(cfg, tokenizer)
    if plan.done:
        return plan.final
    plan.final.parent.mkdir(parents=True, exist_ok=True)
    start_partial(plan)
    activate = Path(sys.prefix) / "bin" / "activate"  # the jobs run in this environment
    common = dict(time=pcfg.slurm_time, partition=pcfg.slurm_partition,
                  mem_per_cpu_gb=pcfg.slurm_mem_per_cpu_gb, skip_completed=True,
                  venv_path=str(activate) if activate.is_file() else None)
    tokenize = SlurmPipelineExecutor(
        [TokenizeChunks(plan)], tasks=_tasks(plan, pcfg), cpus_per_task=pcfg.slurm_cpus_per_task,
        job_name=pcfg.slurm_job_name, logging_dir=_logging_dir(plan, pcfg) + "/tokenize",
        **common)
    SlurmPipelineExecutor(
        [PublishStep(plan)], tasks=1, job_name=pcfg.slurm_job_name + "_publish",
        logging_dir=_logging_dir(plan, pcfg) + "/publish", depends=tokenize, **common).run()
    print(f"submitted {len(plan.chunks)} chunks as SLURM jobs; the prepared directory will be "
          f"{plan.final}", flush=True)
    return None


class Progress:
    """A tqdm bar over the plan's bytes, fed by the chunk records as tasks write them."""

    def __init__(self, plan: Plan, interval: float = 1.0):
        self.plan, self.interval = plan, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "Progress":
        self._seen: set[Path] = set(self._records())  # done before this session: not in rates
        done = sum(self.plan.chunks[self._index(p)].nbytes for p in self._seen)
        self._bar = tqdm(total=sum(c.nbytes for c in self.plan.chunks), initial=done, unit="B",
                         unit_scale=True, desc=f"prepare {self.plan.final.name}")
        self._start, self._docs, self._tokens = time.perf_counter(), 0, 0
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._update()
        self._bar.close()

    def _records(self) -> list[Path]:
        return sorted((self.plan.partial / "chunks").glob("chunk_*.json"))

    @staticmethod
    def _index(path: Path) -> int:
        return int(path.stem.split("_")[1])

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._update()

    def _update(self) -> None:
        for path in self._records():
            if path in self._seen:
                continue
            record = json.loads(path.read_text())
            self._seen.add(path)
            self._docs += record["documents"]["total"]
            self._tokens += sum(s["tokens"] for split in record["shards"].values() for s in split)
            self._bar.update(record["bytes"])
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        self._bar.set_postfix_str(f"{self._docs / elapsed:,.0f} docs/s, "
                                  f"{self._tokens / elapsed:,.0f} tokens/s", refresh=True)


def prepare_command(cfg: DataConfig, pcfg: PrepareConfig) -> dict[str, Optional[Path]]:
    """What `python -m moe_lm.prepare` does: every source (or data.path) on the engine.

    Returns {source name ("" without a mixture): its prepared directory, None if submitted}.
    """
    check_engine(pcfg)
    tokenizer = get_tokenizer(cfg.tokenizer)
    return prepare_sources(cfg, tokenizer,
                           prepare_fn=lambda c, tok: prepare_on_engine(c, tok, pcfg))
