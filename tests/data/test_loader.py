"""The loader: packed (B, S+1) int64 windows covering the stream, seeded order, exact resume,
disjoint ranks and a fixed validation set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_lm.data import TokenLoader, prepare
from moe_lm.errors import DataError

from .conftest import DOCS, make_shard_dir, read_split

S, B = 8, 4


@pytest.fixture
def shards(tmp_path):
    # train: 8 * 50 + 1 tokens -> exactly 50 windows; split over shards of 37 tokens so that
    # windows straddle shard files.
    return make_shard_dir(tmp_path / "shards", {"train": S * 50 + 1, "val": S * 20 + 1},
                          shard_tokens=37)


def window_ids(batch: torch.Tensor) -> list[int]:
    """In a 0, 1, 2, ... stream, window w starts with token w * S."""
    return (batch[:, 0] // S).tolist()


def test_batches_are_int64_windows_of_consecutive_tokens(shards):
    loader = TokenLoader(shards, "train", seq_len=S, batch_size=B, seed=0)
    batch = loader.next_batch()
    assert batch.shape == (B, S + 1) and batch.dtype == torch.int64
    for row in batch:  # consecutive tokens, also across the 37-token shard files
        assert torch.equal(row, torch.arange(row[0], row[0] + S + 1))
        assert row[0] % S == 0  # stride S: each window's last token starts the next window


def test_an_epoch_serves_every_window_once(shards):
    loader = TokenLoader(shards, "train", seq_len=S, batch_size=B, seed=0)
    assert loader.n_windows == 50 and loader.batches_per_epoch == 12  # 48 of 50 windows
    seen = [w for _ in range(12) for w in window_ids(loader.next_batch())]
    assert len(set(seen)) == 48 and set(seen) <= set(range(50))
    assert loader.state_dict() == {"epoch": 1, "position": 0}
    second = [w for _ in range(12) for w in window_ids(loader.next_batch())]
    assert second != seen  # a new permutation each epoch


def test_same_seed_same_batches_other_seed_other_batches(shards):
    a = TokenLoader(shards, "train", seq_len=S, batch_size=B, seed=7)
    b = TokenLoader(shards, "train", seq_len=S, batch_size=B, seed=7)
    c = TokenLoader(shards, "train", seq_len=S, batch_size=B, seed=8)
    batches_a = [a.next_batch() for _ in range(5)]
    assert all(torch.equal(x, b.next_batch()) for x in batches_a)
    assert not all(torch.equal(x, c.next_batch()) for x in batches_a)


@pytest.mark.parametrize("taken", [0, 3, 11, 12, 20])  # incl. the last batch of an epoch
def test_resumed_loader_yields_the_uninterrupted_batches(shards, taken):
    run = TokenLoader(shards, "train", seq_len=S, batch_size=B, seed=3)
    for _ in range(taken):
        run.next_batch()
    state = run.state_dict()
    assert set(state) == {"epoch", "position"} and all(type(v) is int for v in state.values())
    resumed = TokenLoader(shards, "train", seq_len=S, batch_size=B, seed=3)
    resumed.load_state_dict(dict(state))
    for _ in range(15):
        assert torch.equal(run.next_batch(), resumed.next_batch())


def test_ranks_get_disjoint_windows_and_equal_batch_counts(shards):
    world = 3
    loaders = [TokenLoader(shards, "train", seq_len=S, batch_size=B, seed=1, rank=r,
                           world_size=world) for r in range(world)]
    assert {ld.batches_per_epoch for ld in loaders} == {50 // (B * world)}
    per_rank = [{w for _ in range(ld.batches_per_epoch) for w in window_ids(ld.next_batch())}
                for ld in loaders]
    for i in range(world):
        for j in range(i + 1, world):
            assert not per_rank[i] & per_rank[j]
    assert sum(map(len, per_rank)) == 4 * B * world


def test_val_batches_are_fixed_spread_and_disjoint_across_ranks(shards):
    val = TokenLoader(shards, "val", seq_len=S, batch_size=2, seed=0)
    first = list(val.val_batches(3))
    val.next_batch()  # the training position does not change the validation set
    again = list(TokenLoader(shards, "val", seq_len=S, batch_size=2, seed=99).val_batches(3))
    assert len(first) == 3 and all(torch.equal(x, y) for x, y in zip(first, again))
    assert all(torch.equal(x, y) for x, y in zip(first, val.val_batches(3)))
    ids = [w for b in first for w in window_ids(b)]
    assert ids == sorted(ids) and ids[-1] >= 15  # spread over the 20 windows, not the first 6
    assert len(list(val.val_batches(1000))) == 10  # capped at what the split holds
    ranks = [[w for b in TokenLoader(shards, "val", seq_len=S, batch_size=2, seed=0, rank=r,
                                     world_size=2).val_batches(2) for w in window_ids(b)]
             for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])


def test_loader_reads_prepared_shards(tmp_path, data_cfg, tok):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, doc in enumerate(DOCS * 3):
        (docs / f"{i:02d}.txt").write_text(doc)
    shard_dir = prepare(data_cfg(docs), tok)
    stream = read_split(shard_dir, "train").astype(np.int64)
    loader = TokenLoader(shard_dir, "train", seq_len=16, batch_size=2, seed=0)
    batch = loader.next_batch()
    for row in batch.numpy():
        starts = [i for i in range(0, len(stream) - 16, 16) if stream[i:i + 17].tolist() ==
                  row.tolist()]
        assert starts  # every row is a window of the prepared stream
    assert (stream == tok.eot_id).sum() > 0


def test_state_from_other_settings_is_rejected(shards):
    loader = TokenLoader(shards, "train", seq_len=S, batch_size=B, seed=0)
    with pytest.raises(DataError, match="same settings"):
        loader.load_state_dict({"epoch": 0, "position": 999})
    with pytest.raises(DataError, match="epoch"):
        loader.load_state_dict({"step": 3})
