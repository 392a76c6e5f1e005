"""Tiny random Hugging Face models (built with transformers' own config classes) and tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 320
TEXT = ("The quick brown fox jumps over the lazy dog. def main(): return 42\n"
        "Mixture-of-experts models route each token to a few experts. ") * 20


def hf_config(family: str, **overrides):
    """A 3-layer, 8-expert fp32 config of the family, with overrides (Qwen3-MoE: one dense layer)."""
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, rms_norm_eps=1e-6,
                  max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=0)
    if family == "mixtral":
        kw = dict(common, intermediate_size=48, num_local_experts=8,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        cls = transformers.MixtralConfig
    elif family == "qwen3_moe":
        kw = dict(common, intermediate_size=80, moe_intermediate_size=32, num_experts=8,
                  head_dim=24, mlp_only_layers=[0], norm_topk_prob=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        cls = transformers.Qwen3MoeConfig
    else:
        kw = dict(common, intermediate_size=32, num_experts=8, norm_topk_prob=False, clip_qkv=3.0,
                  pad_token_id=1, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
        cls = transformers.OlmoeConfig
    kw.update(overrides)
    return cls(**kw)


def save_hf_model(path: Path, config, seed: int = 0, max_shard_size=None):
    """A random model of `config` saved with save_pretrained (the hub layout); returns it."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # norms start at 1 and the router at 0 in some families: randomise all
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif ".gate." in name or name.endswith("gate.weight"):
                p.normal_(0.0, 0.5)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    save_tokenizer(path, byte_level=config.model_type != "mixtral")
    return model


def save_tokenizer(path: Path, byte_level: bool = True) -> None:
    """A small BPE tokenizer: byte-level with <|endoftext|> (Qwen/OLMoE-like), or
    SentencePiece-like (Metaspace + byte fallback, <s> before each text, </s>: Mixtral-like)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    path.mkdir(parents=True, exist_ok=True)
    if byte_level:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = ["<|endoftext|>"]
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator([TEXT], trainer)
        cfg = {"eos_token": "<|endoftext|>", "bos_token": None}
    else:
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300,
                                                            special_tokens=specials))
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
        cfg = {"eos_token": "</s>", "bos_token": "<s>", "add_bos_token": True}
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.fixture(params=["mixtral", "qwen3_moe", "olmoe"])
def family(request) -> str:
    return request.param
