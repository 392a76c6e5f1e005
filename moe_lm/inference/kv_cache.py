"""The key/value cache for generation: each attention layer keeps the keys and values it has seen.

Legend: B batch, S new positions, T positions cached so far (including the new ones), G key/value
heads, Dh head width.

`Transformer.forward(tokens, cache=cache)` reads `cache.length` as the position of the first new
token, and each attention layer appends its new keys/values through `LayerKVCache.update`, which
returns everything cached so far plus the mask the new queries need. Buffers are allocated once,
at the first update, in the dtype the model computes in, for `max_len` positions.
"""

from __future__ import annotations

import torch

from moe_lm.errors import MoeLMError


class LayerKVCache:
    """One attention layer's cached keys and values, `(B, max_len, G, Dh)` each."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k_BTGD: torch.Tensor | None = None
        self.v_BTGD: torch.Tensor | None = None

    def update(self, k_BSGD: torch.Tensor, v_BSGD: torch.Tensor):
        """Appends S new positions; returns all keys, all values and the boolean (S, T) mask.

        The mask is None when nothing was cached before (plain causal attention applies).
        """
        B, S, G, Dh = k_BSGD.shape
        start, end = self.length, self.length + S
        if end > self.max_len:
            raise MoeLMError(f"The KV cache holds {self.max_len} positions but {end} are needed: "
                             "lower --max-new-tokens or shorten the prompt.")
        if self.k_BTGD is None:
            self.k_BTGD = k_BSGD.new_zeros(B, self.max_len, G, Dh)
            self.v_BTGD = v_BSGD.new_zeros(B, self.max_len, G, Dh)
        self.k_BTGD[:, start:end] = k_BSGD
        self.v_BTGD[:, start:end] = v_BSGD
        self.length = end
        mask_ST = None
        if start > 0:  # new query i (position start+i) sees cached positions <= start+i
            query_pos_S = torch.arange(start, end, device=k_BSGD.device)
            mask_ST = torch.arange(end, device=k_BSGD.device)[None, :] <= query_pos_S[:, None]
        return self.k_BTGD[:, :end], self.v_BTGD[:, :end], mask_ST


class KVCache:
    """The caches of all layers of a model; `length` is the number of positions processed."""

    def __init__(self, n_layers: int, max_len: int):
        self.layers = [LayerKVCache(max_len) for _ in range(n_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length


class PaddedLayerKVCache(LayerKVCache):
    """One layer's cache for a batch of left-padded sequences: pad keys are never attended to.

    `update` returns a `(B, 1, S, T)` mask: causal, and blind to each row's leading pad positions.
    A pad query still sees itself, so its attention row is never all masked (which would make
    NaNs that travel on through the pad positions' values).
    """

    def __init__(self, max_len: int, valid_BT: torch.Tensor):
        super().__init__(max_len)
        self.valid_BT = valid_BT  # shared by all layers of one PaddedKVCache

    def update(self, k_BSGD: torch.Tensor, v_BSGD: torch.Tensor):
        start = self.length
        k_BTGD, v_BTGD, _ = super().update(k_BSGD, v_BSGD)
        end = self.length
        query_pos_S1 = torch.arange(start, end, device=k_BSGD.device)[:, None]
        key_pos_1T = torch.arange(end, device=k_BSGD.device)[None, :]
        causal_ST = key_pos_1T <= query_pos_S1
        visible_BST = causal_ST & (self.valid_BT[:, None, :end] | (key_pos_1T == query_pos_S1))
        return k_BTGD, v_BTGD, visible_BST[:, None]

    def keep_rows(self, rows_R: torch.Tensor) -> None:
        """Drops every sequence of the batch but `rows_R` (finished generations)."""
        if self.k_BTGD is not None:
            self.k_BTGD, self.v_BTGD = self.k_BTGD[rows_R], self.v_BTGD[rows_R]


class PaddedKVCache(KVCache):
    """The caches of all layers for a batch of prompts left-padded to one length.

    `pad_B[b]` leading positions of row b are padding. Rotary positions then start at `pad_B[b]`
    instead of 0 for that row; attention scores depend only on position differences, so this
    changes nothing but rounding.
    """

    def __init__(self, n_layers: int, max_len: int, pad_B: torch.Tensor):
        self.valid_BT = torch.arange(max_len, device=pad_B.device)[None, :] >= pad_B[:, None]
        self.layers = [PaddedLayerKVCache(max_len, self.valid_BT) for _ in range(n_layers)]

    def keep_rows(self, rows_R: torch.Tensor) -> None:
        """Keeps only the sequences `rows_R` (indices into the current batch), in that order."""
        self.valid_BT = self.valid_BT[rows_R]
        for layer in self.layers:
            layer.keep_rows(rows_R)
            layer.valid_BT = self.valid_BT
