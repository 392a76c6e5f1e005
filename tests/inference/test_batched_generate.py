"""Batched generation (left-padded prompts, per-row stop, one preallocated KV cache) against
each prompt generated alone without a cache, and against transformers' own `generate`."""

from __future__ import annotations

import pytest
import torch

from moe_lm.config import ExpertConfig, LossConfig, ModelConfig
from moe_lm.inference import load_model
from moe_lm.inference.generate import generate_batch, generate_tokens, left_pad
from moe_lm.interop.hf_export import export
from moe_lm.model import Transformer

PROMPTS = [[5, 17, 3, 99, 42, 8, 61, 7, 12], [9, 8], [150, 3, 3, 40, 77]]


def small_model(n_layers: int = 3, **model_kw) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=n_layers, d_model=64, n_heads=4, n_kv_heads=2,
                                    ffn_hidden=96, vocab_size=200, init_std=0.2, **model_kw),
                        ExpertConfig(num_experts=4, hidden_size=32), LossConfig())
    model.init_weights()
    return model.eval()


def test_left_padded_batch_generates_what_each_prompt_generates_alone_without_cache():
    model = small_model()
    batched = generate_batch(model, PROMPTS, 12)
    alone = [list(generate_tokens(model, p, 12, use_cache=False)) for p in PROMPTS]
    assert batched == alone


def test_shared_layers_get_one_cache_entry_per_applied_layer():
    # 2 distinct blocks applied twice each: the cache must hold 4 layers' keys and values
    model = small_model(n_layers=4, n_dense_layers=2, share_layers=2)
    batched = generate_batch(model, PROMPTS, 8)
    alone = [list(generate_tokens(model, p, 8, use_cache=False)) for p in PROMPTS]
    assert batched == alone


def test_a_row_stops_at_the_stop_token_while_the_others_go_on():
    model = small_model()
    free = generate_batch(model, PROMPTS, 12)
    stop = free[1][2]  # the third token row 1 emits
    stopped = generate_batch(model, PROMPTS, 12, stop_id=stop)
    for row_free, row in zip(free, stopped):
        cut = row_free.index(stop) + 1 if stop in row_free else len(row_free)
        assert row == row_free[:cut]
    assert len(stopped[1]) <= 3


def test_seeded_batched_sampling_is_reproducible():
    model = small_model()
    kw = dict(temperature=1.0, top_k=20, seed=4)
    assert generate_batch(model, PROMPTS, 8, **kw) == generate_batch(model, PROMPTS, 8, **kw)


def test_batched_greedy_tokens_equal_transformers_generate_on_the_exported_model(tiny_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(export(tiny_run, tmp_path / "hf"),
                                                           dtype=torch.float32).eval()
    loaded = load_model(tiny_run, device="cpu")
    tok = loaded.tokenizer
    prompts = [tok.encode(t) for t in ("def parse(self, text):\n    return", "import os", "x = 1")]
    ours = generate_batch(loaded.model, prompts, 10)
    ids_BP, pad_B = left_pad(prompts, tok.eot_id, "cpu")
    mask_BP = (torch.arange(ids_BP.shape[1])[None, :] >= pad_B[:, None]).long()
    with torch.no_grad():
        out = hf.generate(ids_BP, attention_mask=mask_BP, max_new_tokens=10, min_new_tokens=10,
                          do_sample=False, pad_token_id=tok.eot_id, eos_token_id=None)
    assert ours == out[:, ids_BP.shape[1]:].tolist()
