"""Weighted data mixtures: `data.sources: [{name, path, weight}, ...]`, one prepared directory each.

Which source each sequence comes from is decided over the global batch (`batch_size x world_size`
sequences), never per rank, so any number of ranks reads the same global batches: the run's n-th
sequence goes to the source whose count lags its share `weight_k / sum(weights) * (n + 1)` the most
(ties to the first listed), which keeps every source within one sequence of its exact share at
all times. The labels of a global batch are then shuffled with a generator seeded by
`(seed, batch)`, so no rank or batch row favours a source, and rank r serves the slots
`[r * batch_size, (r + 1) * batch_size)`: concatenating the ranks' batches gives the batch one
process with `batch_size x world_size` reads.

Inside a source, sequences are that source's windows (as in `TokenLoader`) in a permutation
seeded by `(seed, epoch, source index)`, taken in order; a source smaller than its share of the run
repeats, epoch after epoch, and `epochs()` says how many epochs of each the run has seen. The
position is the number of global batches taken and the sequences taken from each source, so
`state_dict()` / `load_state_dict()` resume to the exact batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from moe_lm.config import DataConfig, SourceConfig
from moe_lm.data.loader import TokenLoader
from moe_lm.data.prepare import prepare
from moe_lm.data.tokenizer import Tokenizer
from moe_lm.errors import ConfigError, DataError


def check_sources(cfg: DataConfig) -> list[SourceConfig]:
    """The mixture's sources, checked; ConfigError naming what to change. [] without a mixture."""
    sources = list(cfg.sources)
    if not sources:
        return []
    if cfg.path not in (None, ""):
        raise ConfigError(f"data.path={cfg.path!r} and data.sources are both set: a mixture "
                          "takes its files from each source's path. Remove data.path, or move "
                          "it into data.sources as one more {name, path, weight}.")
    names = [s.name for s in sources]
    for s in sources:
        if not s.name or not s.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"data.sources: the name {s.name!r} must be a non-empty word of "
                              "letters, digits, '_' or '-' (it names val/<name>/loss).")
        if not (isinstance(s.weight, (int, float)) and math.isfinite(s.weight) and s.weight > 0):
            raise ConfigError(
                f"data.sources: source {s.name!r} has weight {s.weight}; every weight must be a "
                "positive number (the shares are weight / sum of weights). Give it a weight > 0 "
                "or remove the source from the mixture.")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"data.sources: the names {dup} appear more than once; give each "
                          "source its own name.")
    return sources


def source_config(cfg: DataConfig, source: SourceConfig) -> DataConfig:
    """The DataConfig that prepares one source of the mixture on its own."""
    return replace(cfg, path=source.path, sources=[])


def prepare_sources(cfg: DataConfig, tokenizer: Tokenizer,
                    prepare_fn: Callable[[DataConfig, Tokenizer], Path] = prepare
                    ) -> dict[str, Path]:
    """Prepares `data.path`, or every source of the mixture: {name: shard directory}.

    The name of the single source of a run without a mixture is "" (its rows stay `val_loss`).
    DataError, naming the source, for a missing path or a source without text.
    """
    sources = check_sources(cfg)
    if not sources:
        return {"": prepare_fn(cfg, tokenizer)}
    out = {}
    for s in sources:
        try:
            out[s.name] = prepare_fn(source_config(cfg, s), tokenizer)
        except DataError as err:
            raise DataError(f"data.sources: source {s.name!r} (path={s.path!r}): {err}") from err
    return out


@dataclass
class RunData:
    """A run's training loader and its validation loaders, one per source, with the weights."""

    train: "TokenLoader | MixtureLoader"
    val: dict[str, TokenLoader]  # {"": loader} without a mixture
    weights: dict[str, float]  # normalised to sum 1

    def val_loss(self, losses: dict[str, float]) -> float:
        """The mixture's loss: per-source losses averaged with the mixture's weights."""
        return sum(self.weights[name] * loss for name, loss in losses.items())

    def eval_row(self, losses: dict[str, float]) -> dict[str, float]:
        """`val_loss` and, for a mixture, `val/<name>/loss` and `data/<name>/epochs` (seen)."""
        row = {"val_loss": self.val_loss(losses)}
        if isinstance(self.train, MixtureLoader):
            row.update({f"val/{name}/loss": loss for name, loss in losses.items()})
            row.update({f"data/{name}/epochs": e for name, e in self.train.epochs().items()})
        return row


def open_run_data(cfg: DataConfig, tokenizer: Tokenizer, seed: int, rank: int = 0,
                  world_size: int = 1) -> RunData:
    """Prepares the data (cached) and opens the loaders a training run reads."""
    dirs = prepare_sources(cfg, tokenizer)
    val = {name: TokenLoader(d, "val", cfg.seq_len, cfg.batch_size, seed, rank, world_size)
           for name, d in dirs.items()}
    if list(dirs) == [""]:
        train = TokenLoader(dirs[""], "train", cfg.seq_len, cfg.batch_size, seed, rank, world_size)
        return RunData(train, val, {"": 1.0})
    weights = [s.weight for s in cfg.sources]
    train = MixtureLoader(list(dirs.values()), list(dirs), weights, cfg.seq_len, cfg.batch_size,
                          seed, rank, world_size)
    total = sum(weights)
    return RunData(train, val, {n: w / total for n, w in zip(dirs, weights)})


class MixtureLoader:
    """Global batches drawn from several prepared directories in proportion to their weights.

    Args:
        shard_dirs, names, weights: one entry per source, in the mixture's order.
        seq_len, batch_size, seed, rank, world_size: as for `TokenLoader`.
    """

    def __init__(self, shard_dirs: list, names: list[str], weights: list[float], seq_len: int,
                 batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must lie in [0, world_size={world_size}).")
        self.names, self.seq_len, self.batch_size = list(names), seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        total = float(sum(weights))
        if not total > 0:
            raise ConfigError(f"data.sources: the weights {weights} must sum to a positive "
                              "number; give every source a weight > 0.")
        self.shares = np.asarray(weights, dtype=np.float64) / total
        # One-window loaders: only their windows and reads are used, never their order.
        self.sources = [TokenLoader(d, "train", seq_len, 1, seed) for d in shard_dirs]
        self.batches = 0  # global batches taken
        self.taken = np.zeros(len(self.sources), dtype=np.int64)  # sequences taken per source
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    @property
    def global_batch(self) -> int:
        """Sequences per global batch (batch_size x world_size)."""
        return self.batch_size * self.world_size

    def next_batch(self) -> torch.Tensor:
        """This rank's `(batch_size, seq_len + 1)` int64 slice of the next global batch."""
        labels, index = self.plan_batch(self.batches, self.taken)
        lo = self.rank * self.batch_size
        rows = [self._window(int(k), int(i)) for k, i in
                zip(labels[lo:lo + self.batch_size], index[lo:lo + self.batch_size])]
        self.taken += np.bincount(labels, minlength=len(self.sources))
        self.batches += 1
        return torch.from_numpy(np.stack(rows))

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def plan_batch(self, batch: int, taken: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source of each slot, its sequence number in that source) for global batch `batch`,
        given the sequences `taken` from each source before it."""
        counts = taken.astype(np.float64).copy()
        n = float(taken.sum())
        labels = np.empty(self.global_batch, dtype=np.int64)
        for j in range(self.global_batch):
            k = int(np.argmax(self.shares * (n + 1) - counts))  # the most-lagging source
            labels[j] = k
            counts[k] += 1
            n += 1
        labels = labels[np.random.default_rng([self.seed, batch]).permutation(self.global_batch)]
        index = np.empty_like(labels)
        nxt = taken.astype(np.int64).copy()
        for j, k in enumerate(labels):
            index[j] = nxt[k]
            nxt[k] += 1
        return labels, index

    def _window(self, k: int, i: int) -> np.ndarray:
        """Sequence `i` of source `k`: epoch i // W of its seeded window order."""
        src = self.sources[k]
        epoch, pos = divmod(i, src.n_windows)
        key = (k, epoch)
        if key not in self._orders:
            if len(self._orders) > 4 * len(self.sources):  # keep the current epochs only
                self._orders.clear()
            rng = np.random.default_rng([self.seed, epoch, k, 1])
            self._orders[key] = rng.permutation(src.n_windows)
        return src.gather(self._orders[key][pos:pos + 1])[0].numpy()

    def epochs(self) -> dict[str, float]:
        """Epochs of each source seen so far over all ranks (> 1: the source repeated)."""
        return {name: float(t) / src.n_windows
                for name, t, src in zip(self.names, self.taken, self.sources)}

    def state_dict(self) -> dict:
        """The position: global batches taken and sequences taken from each source."""
        return {"batches": self.batches, "taken": [int(t) for t in self.taken],
                "sources": list(self.names)}

    def load_state_dict(self, state: dict) -> None:
        """Continues from a `state_dict()` of a mixture of the same sources."""
        if state.get("sources") != self.names or len(state.get("taken", [])) != len(self.names):
            raise DataError(
                f"The checkpoint's data position is for the sources {state.get('sources')}, this "
                f"run mixes {self.names}. Resume with the same data.sources, or start a new run "
                "directory.")
        self.batches = int(state["batches"])
        self.taken = np.asarray(state["taken"], dtype=np.int64)


def planned_epochs(loader: MixtureLoader, steps: int) -> dict[str, float]:
    """Epochs of each source a run of `steps` global batches will see."""
    seqs = steps * loader.global_batch
    return {name: seqs * share / src.n_windows
            for name, share, src in zip(loader.names, loader.shares, loader.sources)}

