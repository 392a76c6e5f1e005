"""The key/value cache for generation: each attention layer keeps the keys and values it has seen.

Legend: B batch, S new positions, T positions cached so far (including the new ones), G key/value
heads, Dh head width, F rotary frequencies (Dh/2).

`Transformer.forward(tokens, cache=cache)` calls `cache.begin(S, ...)` once per forward: it
reserves S positions, returns their rotary tables and computes the one attention mask every layer
uses; each attention layer then appends its new keys/values through `LayerKVCache.update`. Buffers
are allocated once, at the first update, in the dtype the model computes in, for `max_len`
positions, so decoding never reallocates or concatenates.

Batched generation left-pads its prompts: row b starts with `pad_B[b]` padding positions. Those
keys are masked out for every query and the row's positions (rotary angles) count from its first
real token, so each row computes what it would alone.
"""

from __future__ import annotations

import torch

from moe_lm.errors import MoeLMError
from moe_lm.model.transformer import rotary_tables


class LayerKVCache:
    """One attention layer's cached keys and values, `(B, max_len, G, Dh)` each."""

    def __init__(self, parent: "KVCache"):
        self.parent = parent
        self.k_BTGD: torch.Tensor | None = None
        self.v_BTGD: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.parent.length

    def update(self, k_BSGD: torch.Tensor, v_BSGD: torch.Tensor):
        """Writes the S new positions; returns all keys, all values and the attention mask.

        The mask is None when plain causal attention over the new keys applies (an unpadded
        prefill); else boolean, (S, T) or (B, 1, S, T), True where a query may attend.
        """
        B, S, G, Dh = k_BSGD.shape
        start, end = self.parent.start, self.parent.length
        if self.k_BTGD is None:
            self.k_BTGD = k_BSGD.new_zeros(B, self.parent.max_len, G, Dh)
            self.v_BTGD = v_BSGD.new_zeros(B, self.parent.max_len, G, Dh)
        self.k_BTGD[:, start:end] = k_BSGD
        self.v_BTGD[:, start:end] = v_BSGD
        return self.k_BTGD[:, :end], self.v_BTGD[:, :end], self.parent.mask


class KVCache:
    """The caches of all layers of a model; `length` is the number of positions processed.

    `pad_B` (optional, (B,) int) is the left padding of each row of a batched generation.
    """

    def __init__(self, n_layers: int, max_len: int, pad_B: torch.Tensor | None = None):
        self.max_len = max_len
        self.start = self.length = 0
        self.pad_B = pad_B if pad_B is not None and bool(pad_B.any()) else None
        self.mask: torch.Tensor | None = None
        self.rope_TF2: torch.Tensor | None = None
        self.layers = [LayerKVCache(self) for _ in range(n_layers)]

    def begin(self, S: int, head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
        """Reserves S new positions; returns their rotary tables, (S, F, 2) or (B, S, F, 2)."""
        start, end = self.length, self.length + S
        if end > self.max_len:
            raise MoeLMError(f"The KV cache holds {self.max_len} positions but {end} are needed: "
                             "lower --max-new-tokens or shorten the prompt.")
        if self.rope_TF2 is None:  # once per generation, not once per token
            self.rope_TF2 = rotary_tables(self.max_len, head_dim, theta, device)
        self.start, self.length = start, end
        query_S = torch.arange(start, end, device=device)
        key_T = torch.arange(end, device=device)
        if self.pad_B is None:
            self.mask = None if start == 0 else key_T[None, :] <= query_S[:, None]
            return self.rope_TF2[start:end]
        pad_B11 = self.pad_B.to(device)[:, None, None]
        causal_1ST = (key_T[None, :] <= query_S[:, None])[None]
        # a padding query sees itself only, so its softmax has one finite term (its output is
        # never read); real queries never see padding keys
        self.mask = ((causal_1ST & (key_T >= pad_B11)) | (key_T == query_S[:, None]))[:, None]
        pos_BS = (query_S[None, :] - self.pad_B.to(device)[:, None]).clamp_min(0)
        return self.rope_TF2[pos_BS]

    def keep_rows(self, rows_R: torch.Tensor) -> None:
        """Keeps only the sequences `rows_R` (indices into the current batch), in that order
        (finished generations leave the batch)."""
        if self.pad_B is not None:
            self.pad_B = self.pad_B[rows_R.to(self.pad_B.device)]
        for layer in self.layers:
            if layer.k_BTGD is not None:
                layer.k_BTGD, layer.v_BTGD = layer.k_BTGD[rows_R], layer.v_BTGD[rows_R]


class PaddedKVCache(KVCache):
    """A KVCache for a batch of prompts left-padded to one length (`pad_B[b]` leading pad
    positions in row b), always masking: the name the lm-eval model uses."""

    def __init__(self, n_layers: int, max_len: int, pad_B: torch.Tensor):
        super().__init__(n_layers, max_len, pad_B)
        self.pad_B = pad_B  # kept even when no row is padded, so keep_rows can index it
