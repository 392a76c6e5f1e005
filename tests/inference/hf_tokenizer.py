"""A transformers tokenizer giving a moe_lm (tiktoken) tokenizer's ids, for lm-eval's `hf`."""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

from moe_lm.data import Tokenizer


def hf_tokenizer_like(tokenizer: Tokenizer):
    """A PreTrainedTokenizerFast that encodes and decodes as `tokenizer` does (same ids).

    transformers' TikTokenConverter appends the special tokens after the last BPE rank; cl100k's
    ids have a gap there, so they are put into the vocabulary at their tiktoken ids first.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = tokenizer._enc
    specials = dict(enc._special_tokens)

    class Converter(TikTokenConverter):
        def extract_vocab_merges_from_model(self, tiktoken_url):
            vocab, merges = super().extract_vocab_merges_from_model(tiktoken_url)
            return {**vocab, **specials}, merges

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "ranks.tiktoken")
        Path(path).write_text("".join(  # tiktoken's own format (its writer needs blobfile)
            f"{base64.b64encode(token).decode()} {rank}\n"
            for token, rank in enc._mergeable_ranks.items()))
        converted = Converter(vocab_file=path, pattern=enc._pat_str,
                              extra_special_tokens=specials).converted()
    eot = tokenizer.decode([tokenizer.eot_id])
    return PreTrainedTokenizerFast(tokenizer_object=converted, eos_token=eot, pad_token=eot)
