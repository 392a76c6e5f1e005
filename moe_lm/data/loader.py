"""The batch loader: packed `(B, S+1)` token windows in a seeded order, resumable and rank-aware.

A split's shards are memory-mapped and read as one stream of N tokens. Window `w` is the tokens
`[w*S, w*S + S + 1)`: consecutive windows share one token, so inputs `x = win[:, :-1]` and targets
`y = win[:, 1:]` together cover every token of the stream (W = (N - 1) // S windows). Documents are
packed across window boundaries, separated by the end-of-text token written by `prepare`.

Each epoch visits the windows in a permutation seeded by `(seed, epoch)`. The permutation is cut to
a multiple of `batch_size * world_size` (the few windows left over differ from epoch to epoch) and
dealt round-robin to the ranks, so ranks see disjoint windows and the same number of batches. The
loader's position is two integers, `epoch` and `position` (batches already taken this epoch):
`state_dict()` / `load_state_dict()` make a restarted run draw exactly the batches that the
uninterrupted run would have drawn.

`val_batches(n)` is the fixed evaluation set: n batches of windows spread evenly over the split,
the same on every call and every run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from moe_lm.data.prepare import TOKEN_DTYPE, load_meta
from moe_lm.errors import DataError


class TokenLoader:
    """Seeded, resumable batches of `(batch_size, seq_len + 1)` int64 token windows.

    Args:
        shard_dir: a directory returned by `prepare`.
        split: "train" or "val".
        seq_len: S, the model's sequence length; windows hold S + 1 tokens.
        batch_size: windows per batch on this rank.
        seed: seeds the order of windows in every epoch.
        rank, world_size: this process's share of the data in data-parallel training.
    """

    def __init__(self, shard_dir: str | os.PathLike, split: str, seq_len: int, batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1):
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"data.seq_len={seq_len} and data.batch_size={batch_size} must both "
                            "be >= 1.")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must lie in [0, world_size={world_size}).")
        self.shard_dir = Path(shard_dir)
        self.meta = load_meta(self.shard_dir)
        if split not in self.meta["shards"]:
            raise DataError(f"Unknown split {split!r}; {self.shard_dir} holds "
                            f"{', '.join(self.meta['shards'])}.")
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._shards = [np.memmap(self.shard_dir / s["file"], dtype=TOKEN_DTYPE, mode="r")
                        for s in self.meta["shards"][split] if s["tokens"] > 0]
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])  # shard offsets
        self.n_tokens = int(self._starts[-1])
        self.n_windows = max(0, (self.n_tokens - 1) // seq_len)
        per_step = batch_size * world_size
        if self.n_windows < per_step:
            self._raise_too_small(per_step * seq_len + 1)
        self.batches_per_epoch = self.n_windows // per_step
        self.epoch = 0
        self.position = 0  # batches of this epoch already returned
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    # ------------------------------------------------------------------ training batches

    def next_batch(self) -> torch.Tensor:
        """The next `(batch_size, seq_len + 1)` int64 batch; rolls into the next epoch at its end."""
        order = self._epoch_order(self.epoch)
        b = self.batch_size
        windows = order[self.position * b:(self.position + 1) * b]
        batch = self.gather(windows)
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """The loader's position: `{"epoch", "position"}` (batches taken in that epoch)."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Continues from a `state_dict()` of a loader over the same data and settings."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"Invalid data loader state {state!r}: expected integers "
                            "'epoch' and 'position'.") from exc
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise DataError(
                f"Data loader state {state!r} does not fit this data: the {self.split} split has "
                f"{self.batches_per_epoch} batches per epoch. The data, data.seq_len, "
                "data.batch_size or the number of ranks differ from the run that saved it; "
                "resume with the same settings or start a new run directory."
            )
        self.epoch, self.position = epoch, position

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's window indices for `epoch`, in the order they are served."""
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            usable = self.batches_per_epoch * self.batch_size * self.world_size
            perm = rng.permutation(self.n_windows)[:usable]
            self._order = perm[self.rank::self.world_size]
            self._order_epoch = epoch
        return self._order

    # ------------------------------------------------------------------ validation batches

    def val_batches(self, num_batches: int) -> Iterator[torch.Tensor]:
        """A fixed sequence of up to `num_batches` batches spread evenly over the split.

        Yields fewer when the split holds fewer; the same windows on every call, disjoint across
        ranks, independent of the training position.
        """
        per_batch = self.batch_size * self.world_size
        n_batches = min(num_batches, self.n_windows // per_batch)
        m = n_batches * per_batch
        spread = (np.arange(m, dtype=np.int64) * self.n_windows) // max(m, 1)
        mine = spread[self.rank::self.world_size]
        for i in range(n_batches):
            yield self.gather(mine[i * self.batch_size:(i + 1) * self.batch_size])

    # ------------------------------------------------------------------ reading

    def gather(self, windows: np.ndarray) -> torch.Tensor:
        """The `(len(windows), seq_len + 1)` int64 rows of the given window indices."""
        span = self.seq_len + 1
        out = np.empty((len(windows), span), dtype=np.int64)  # (B, S+1)
        for row, w in enumerate(windows):
            out[row] = self._read(int(w) * self.seq_len, span)
        return torch.from_numpy(out)

    def _read(self, start: int, length: int) -> np.ndarray:
        """Tokens `[start, start + length)` of the split's stream, across shard boundaries."""
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        local = start - int(self._starts[k])
        shard = self._shards[k]
        if local + length <= len(shard):
            return shard[local:local + length]
        parts, need = [], length
        while need:
            piece = self._shards[k][local:local + need]
            parts.append(piece)
            need -= len(piece)
            k, local = k + 1, 0
        return np.concatenate(parts)

    def _raise_too_small(self, needed: int) -> None:
        more = ("raise data.val_fraction or use more data" if self.split == "val" else
                "use more data (a larger data.corpus_mb, or more files under data.path)")
        raise DataError(
            f"The {self.split} split in {self.shard_dir} has {self.n_tokens} tokens, but one "
            f"batch needs {needed} (data.batch_size={self.batch_size} x data.seq_len="
            f"{self.seq_len} x {self.world_size} rank(s), +1 for the shifted targets). Lower "
            f"data.seq_len or data.batch_size, or {more}."
        )
