"""Weighted mixtures: shares follow the weights, batches are seeded and resumable, any number of
ranks reads the same global batches, small sources repeat, and bad sources fail before training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moe_lm.config import DataConfig, SourceConfig, TrainConfig, TrainerConfig
from moe_lm.data import MixtureLoader, TokenLoader, open_run_data
from moe_lm.data.mixture import check_sources, planned_epochs
from moe_lm.data.prepare import ShardWriter
from moe_lm.errors import ConfigError, DataError
from moe_lm.training.summary import mixture_plan, mixture_seen

from .conftest import DOCS

SEQ = 8
OFFSET = 1_000_000  # source k's tokens are k * OFFSET + position: a window names its source


def source_dir(root: Path, k: int, n_tokens: int) -> Path:
    """A prepared-style directory whose train stream is k*OFFSET, k*OFFSET + 1, ..."""
    root.mkdir(parents=True, exist_ok=True)
    shards = {}
    for split, n in (("train", n_tokens), ("val", 64)):
        writer = ShardWriter(root, split)
        writer.write(list(range(k * OFFSET, k * OFFSET + n)))
        shards[split] = writer.close()
    (root / "meta.json").write_text(json.dumps({"shards": shards}))
    return root


@pytest.fixture
def dirs(tmp_path) -> list[Path]:
    return [source_dir(tmp_path / f"s{k}", k, n) for k, n in enumerate((8001, 2401, 801))]


def mixture(dirs, batch_size=8, rank=0, world_size=1, weights=(0.6, 0.3, 0.1), seed=5):
    return MixtureLoader(dirs, ["web", "code", "books"], list(weights), SEQ, batch_size, seed,
                         rank, world_size)


def take(loader, n) -> list[np.ndarray]:
    return [loader.next_batch().numpy() for _ in range(n)]


def test_shares_follow_the_weights_over_200_batches(dirs):
    batches = np.concatenate(take(mixture(dirs), 200))  # (1600, SEQ + 1)
    assert batches.shape == (1600, SEQ + 1)
    source = batches[:, 0] // OFFSET
    shares = np.bincount(source, minlength=3) / len(source)
    assert np.abs(shares - [0.6, 0.3, 0.1]).max() < 0.02
    # every row is one real window of its source: consecutive tokens of one stream
    assert (np.diff(batches, axis=1) == 1).all() and ((batches[:, 0] % OFFSET) % SEQ == 0).all()


def test_batches_depend_on_the_seed_and_are_reproducible(dirs):
    a, b = take(mixture(dirs), 20), take(mixture(dirs), 20)
    assert all((x == y).all() for x, y in zip(a, b))
    c = take(mixture(dirs, seed=6), 20)
    assert not all((x == y).all() for x, y in zip(a, c))


def test_resume_mid_run_gives_the_uninterrupted_batches(dirs):
    whole = take(mixture(dirs), 200)  # the small source repeats within this run
    first = mixture(dirs)
    take(first, 70)
    state = json.loads(json.dumps(first.state_dict()))  # as saved in a checkpoint
    resumed = mixture(dirs)
    resumed.load_state_dict(state)
    assert all((x == y).all() for x, y in zip(whole[70:], take(resumed, 130)))


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_read_the_global_batches_of_one_process(dirs, world_size):
    one = take(mixture(dirs, batch_size=8), 60)
    ranks = [take(mixture(dirs, batch_size=8 // world_size, rank=r, world_size=world_size), 60)
             for r in range(world_size)]
    for step in range(60):
        assert (np.concatenate([r[step] for r in ranks]) == one[step]).all()


def test_small_source_repeats_each_window_once_per_epoch_and_counts_epochs(dirs):
    loader = mixture(dirs)
    batches = np.concatenate(take(loader, 200))
    books = batches[batches[:, 0] // OFFSET == 2, 0]  # 160 sequences of a 100-window source
    n_windows = loader.sources[2].n_windows
    assert n_windows == 100 and len(books) == 160
    assert sorted(books[:100] % OFFSET // SEQ) == list(range(100))  # epoch 0: a permutation
    assert len(set(books[100:].tolist())) == 60
    epochs = loader.epochs()
    assert epochs["books"] == pytest.approx(1.6) and epochs["web"] < 1
    assert planned_epochs(mixture(dirs), 200)["books"] == pytest.approx(1.6)


def test_the_run_says_how_many_epochs_of_each_source_it_reads(dirs):
    cfg = TrainConfig(trainer=TrainerConfig(max_steps=100, grad_accum=2))  # 200 global batches
    loader = mixture(dirs)
    plan = mixture_plan(loader, cfg)
    assert plan == ("mixture over 100 steps: web 60% (1,000 sequences, 0.96 epochs), code 30% "
                    "(300 sequences, 1.6 epochs, repeats), books 10% (100 sequences, 1.6 epochs, "
                    "repeats)")
    take(loader, 200)
    assert mixture_seen(loader) == ("data seen: web 0.96 epochs, code 1.6 epochs (repeated), "
                                    "books 1.6 epochs (repeated)")
    plain = TokenLoader(dirs[0], "train", SEQ, 8, 0)
    assert mixture_plan(plain, cfg) is None and mixture_seen(plain) is None


def test_resume_with_other_sources_is_refused(dirs):
    state = mixture(dirs).state_dict()
    other = MixtureLoader(dirs[:2], ["web", "code"], [1, 1], SEQ, 8, 5)
    with pytest.raises(DataError, match="same data.sources"):
        other.load_state_dict(state)


# ------------------------------------------------------------------ sources from the config


def write_source(root: Path, docs: list[str]) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(root)


def mix_cfg(tmp_path, sources, **kw) -> DataConfig:
    return DataConfig(sources=[SourceConfig(*s) for s in sources], seq_len=8, batch_size=2,
                      val_fraction=0.25, cache_dir=str(tmp_path / "cache"), **kw)


def test_open_run_data_prepares_each_source_and_weights_the_val_loss(tmp_path, tok):
    docs = DOCS * 6
    cfg = mix_cfg(tmp_path, [("web", write_source(tmp_path / "a", docs), 3.0),
                             ("code", write_source(tmp_path / "b", docs[::-1]), 1.0)])
    data = open_run_data(cfg, tok, seed=0)
    assert isinstance(data.train, MixtureLoader) and list(data.val) == ["web", "code"]
    assert data.weights == {"web": 0.75, "code": 0.25}
    assert data.val["web"].shard_dir != data.val["code"].shard_dir
    row = data.eval_row({"web": 2.0, "code": 4.0})
    assert row["val_loss"] == pytest.approx(2.5)
    assert row["val/web/loss"] == 2.0 and row["data/code/epochs"] == 0.0


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_weight_that_is_not_positive_is_refused(tmp_path, weight):
    cfg = mix_cfg(tmp_path, [("web", "/x", 1.0), ("code", "/y", weight)])
    with pytest.raises(ConfigError, match=r"source 'code' has weight .* positive"):
        check_sources(cfg)


def test_weights_summing_to_nothing_are_refused(dirs):
    with pytest.raises(ConfigError, match="sum to a positive"):
        MixtureLoader(dirs, ["a", "b", "c"], [0, 0, 0], SEQ, 8, 0)


def test_duplicate_names_and_path_with_sources_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"\['web'\] appear more than once"):
        check_sources(mix_cfg(tmp_path, [("web", "/x", 1.0), ("web", "/y", 1.0)]))
    with pytest.raises(ConfigError, match="data.path='/z' and data.sources are both set"):
        check_sources(mix_cfg(tmp_path, [("web", "/x", 1.0)], path="/z"))
    with pytest.raises(ConfigError, match="non-empty word"):
        check_sources(mix_cfg(tmp_path, [("", "/x", 1.0)]))


def test_missing_or_empty_source_is_named_before_training(tmp_path, tok):
    good = write_source(tmp_path / "a", DOCS * 6)
    cfg = mix_cfg(tmp_path, [("web", good, 1.0), ("code", str(tmp_path / "nope"), 1.0)])
    with pytest.raises(DataError, match=r"source 'code' .*does not exist"):
        open_run_data(cfg, tok, seed=0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n")
    cfg = mix_cfg(tmp_path, [("web", good, 1.0), ("books", str(tmp_path / "empty"), 1.0)])
    with pytest.raises(DataError, match=r"source 'books' .*No text found"):
        open_run_data(cfg, tok, seed=0)
