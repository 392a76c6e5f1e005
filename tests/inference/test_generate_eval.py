"""Generation (KV cache, sampling, streaming) and evaluation on a trained tiny run."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from moe_lm.errors import CheckpointError, ConfigError
from moe_lm.inference import load_model
from moe_lm.inference.evaluate import evaluate_loaded
from moe_lm.inference.generate import StreamDecoder, generate_tokens, sample_next_token
from moe_lm.inference.text import token_bytes_fn
from tests.conftest import read_metrics


def test_greedy_generation_with_kv_cache_equals_generation_without(tiny_run):
    loaded = load_model(tiny_run, device="cpu")
    prompt = loaded.tokenizer.encode("def parse(self, text):\n    return")
    cached = list(generate_tokens(loaded.model, prompt, 24, temperature=0.0, use_cache=True))
    uncached = list(generate_tokens(loaded.model, prompt, 24, temperature=0.0, use_cache=False))
    assert len(cached) == 24
    assert cached == uncached


def test_seeded_sampling_with_kv_cache_equals_sampling_without(tiny_run):
    loaded = load_model(tiny_run, device="cpu")
    prompt = loaded.tokenizer.encode("import os")
    kw = dict(temperature=1.0, top_k=50, top_p=0.9, seed=3)
    assert (list(generate_tokens(loaded.model, prompt, 12, use_cache=True, **kw))
            == list(generate_tokens(loaded.model, prompt, 12, use_cache=False, **kw)))


def test_top_k_one_and_tiny_top_p_sample_the_argmax():
    logits_BV = torch.randn(64, 50)
    g = torch.Generator().manual_seed(0)
    argmax = logits_BV.argmax(-1)
    assert torch.equal(sample_next_token(logits_BV, 1.0, top_k=1, generator=g), argmax)
    assert torch.equal(sample_next_token(logits_BV, 1.0, top_p=1e-6, generator=g), argmax)
    assert torch.equal(sample_next_token(logits_BV, 0.0), argmax)


def test_top_k_never_samples_outside_the_k_most_likely():
    logits_BV = torch.randn(1, 30).expand(2000, 30)
    g = torch.Generator().manual_seed(0)
    picked = sample_next_token(logits_BV, 2.0, top_k=3, generator=g)
    allowed = set(logits_BV[0].topk(3).indices.tolist())
    assert set(picked.tolist()) <= allowed and len(set(picked.tolist())) == 3


def test_stream_decoder_holds_back_split_utf8_characters(tiny_run):
    loaded = load_model(tiny_run, device="cpu")
    tok = loaded.tokenizer
    text = "naïve café → 東京"
    ids = tok.encode(text)
    stream = StreamDecoder(token_bytes_fn(tok))
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_eval_on_the_validation_split_matches_the_runs_last_val_loss(tiny_run):
    last = [r for r in read_metrics(tiny_run) if "val_loss" in r][-1]
    result = evaluate_loaded(load_model(tiny_run, device="cpu"))
    assert result.loss == pytest.approx(last["val_loss"], rel=1e-5)
    assert result.ppl == pytest.approx(last["val_ppl"], rel=1e-4)
    assert result.bits_per_byte == pytest.approx(
        result.loss * result.tokens / math.log(2) / result.bytes, rel=1e-9)


def test_eval_on_an_earlier_checkpoint_matches_that_steps_val_loss(tiny_run):
    evals = {r["step"]: r["val_loss"] for r in read_metrics(tiny_run) if "val_loss" in r}
    result = evaluate_loaded(load_model(tiny_run / "checkpoints" / "step_0000005", device="cpu"))
    assert result.loss == pytest.approx(evals[5], rel=1e-5)


def test_eval_source_is_for_mixture_runs_only(tiny_run, tmp_path):
    loaded = load_model(tiny_run, device="cpu")
    with pytest.raises(ConfigError, match="--source web: this run did not train on a data mix"):
        evaluate_loaded(loaded, source="web")
    with pytest.raises(ConfigError, match="--data scores other files. Give one of them"):
        evaluate_loaded(loaded, data=str(tmp_path), source="web")


def test_eval_scores_every_token_of_user_files(tiny_run, tmp_path):
    (tmp_path / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    loaded = load_model(tiny_run, device="cpu")
    result = evaluate_loaded(loaded, data=str(tmp_path), seq_len=16, batch_size=3)
    n_ids = len(loaded.tokenizer.encode((tmp_path / "a.txt").read_text())) + 1  # + end-of-text
    assert result.tokens == (n_ids - 1) // 16 * 16
    assert 0 < result.bits_per_byte < 20 and math.isfinite(result.loss)


@pytest.mark.slow
def test_eval_cli_prints_json_and_reports_bad_paths_clearly(tiny_run, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "moe_lm.eval", str(tiny_run), "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    row = json.loads(ok.stdout.strip().splitlines()[-1])
    assert {"loss", "ppl", "bits_per_byte", "tokens"} <= set(row)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_model(tmp_path)
