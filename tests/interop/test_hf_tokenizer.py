"""Hugging Face tokenizers beside tiktoken: the conventions kept, and a run trained end to end."""

from __future__ import annotations

import shutil

import pytest

from moe_lm.data.tokenizer import HFTokenizer, get_tokenizer
from moe_lm.errors import DataError
from moe_lm.inference import load_model
from tests.conftest import TINY_OVERRIDES, read_metrics
from tests.interop.conftest import save_tokenizer
from tests.training.helpers import train_run

TEXT = "The quick brown fox, naïve café — 42 <|endoftext|> </s> ok"


def test_byte_level_tokenizer_round_trips_text_and_bytes(tmp_path):
    save_tokenizer(tmp_path, byte_level=True)
    tok = get_tokenizer(str(tmp_path))
    assert isinstance(tok, HFTokenizer) and tok.name.startswith("hf-")
    ids = tok.encode(TEXT)
    assert tok.prefix_ids == [] and tok.decode(ids) == TEXT
    assert b"".join(tok.token_bytes(i) for i in ids) == TEXT.encode()
    assert tok.eot_id == tok._tok.token_to_id("<|endoftext|>") and tok.eot_id not in ids
    assert tok.encode_batch([TEXT, "ok"]) == [ids, tok.encode("ok")]


def test_sentencepiece_style_tokenizer_starts_each_text_with_bos_and_ends_with_eos(tmp_path):
    save_tokenizer(tmp_path, byte_level=False)
    tok = get_tokenizer(str(tmp_path / "tokenizer.json"))
    bos, eos = tok._tok.token_to_id("<s>"), tok._tok.token_to_id("</s>")
    ids = tok.encode(TEXT)
    assert tok.prefix_ids == [bos] and ids[0] == bos and tok.eot_id == eos
    assert eos not in ids  # a literal "</s>" in the text stays text
    assert b"".join(tok.token_bytes(i) for i in ids[1:]) == b" " + TEXT.encode()


def test_tokenizer_name_follows_the_file_not_its_place(tmp_path):
    save_tokenizer(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert get_tokenizer(str(tmp_path / "a")).name == get_tokenizer(str(tmp_path / "b")).name
    with pytest.raises(DataError, match="there is no"):
        get_tokenizer(str(tmp_path / "missing"))


@pytest.mark.slow
def test_hf_tokenizer_drives_training_and_the_tools(tmp_path, data_cache):
    save_tokenizer(tmp_path / "tok")
    (tmp_path / "docs").mkdir()
    for i in range(20):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"document {i}: " + TEXT * 30)
    run = tmp_path / "run"
    overrides = [*TINY_OVERRIDES, f"data.cache_dir={data_cache}", f"data.tokenizer={tmp_path / 'tok'}",
                 f"data.path={tmp_path / 'docs'}", "trainer.max_steps=5"]
    train_run(run, overrides)  # as python -m moe_lm.train does, .hydra/config.yaml included
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert len(losses) == 5 and losses[-1] < losses[0]
    loaded = load_model(run, device="cpu")
    assert loaded.tokenizer.name == get_tokenizer(str(tmp_path / "tok")).name
    assert loaded.cfg.model.vocab_size == loaded.tokenizer.n_vocab == 300


def test_distillation_accepts_a_teacher_with_the_same_hf_tokenizer_at_another_path(
        tiny_overrides, tmp_path):
    """The teacher's tokenizer is compared by its recorded name (hf-<hash>), not the path."""
    for where in ("a", "b"):
        save_tokenizer(tmp_path / where)
    short = [*tiny_overrides, "trainer.max_steps=2", "trainer.ckpt_every=2", "model.n_layers=1"]
    train_run(tmp_path / "teacher", [*short, f"data.tokenizer={tmp_path / 'a'}"])
    train_run(tmp_path / "student", [*short, f"data.tokenizer={tmp_path / 'b'}", "loss=distill",
                                     f"loss.distill_teacher={tmp_path / 'teacher'}"])
    rows = [r for r in read_metrics(tmp_path / "student") if "distill_kl" in r]
    assert len(rows) == 2
