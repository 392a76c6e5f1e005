"""Token bytes: what each token id stands for in UTF-8, for streaming text and bits per byte."""

from __future__ import annotations

from typing import Callable

import numpy as np

from moe_lm.data import Tokenizer


def token_bytes_fn(tokenizer: Tokenizer) -> Callable[[int], bytes]:
    """id -> the raw bytes of that token (a token may hold part of a multi-byte character)."""
    return tokenizer.token_bytes


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
    """(vocab_size,) int64 UTF-8 byte length of every id; special and unused ids count 0 bytes.

    Bits per byte divides a text's total loss by its byte count, so the end-of-text token (not
    part of any document) adds its loss but no bytes.
    """
    lengths = np.zeros(vocab_size, dtype=np.int64)
    special_ids = tokenizer.special_ids
    for i in range(min(vocab_size, tokenizer.n_vocab)):
        if i in special_ids:
            continue
        try:
            lengths[i] = len(tokenizer.token_bytes(i))
        except KeyError:  # holes in the id range of some encodings
            pass
    return lengths
