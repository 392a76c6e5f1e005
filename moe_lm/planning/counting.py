"""Counting a model: parameters by component (total and active per token) and training FLOPs.

The counts come from the model itself, built on the meta device (shapes only, nothing allocated),
so they cannot drift from the code: every `nn.Parameter` is put in exactly one component by its
name. `moe_lm.model.count_params` (the closed-form count) must agree; the tests check both against
the instantiated model.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from moe_lm.config import TrainConfig
from moe_lm.data import get_tokenizer
from moe_lm.model import Transformer, is_moe_layer

COMPONENTS = ("embedding", "attention", "norms", "dense_mlp", "router", "experts",
              "shared_experts", "lm_head")


def component_of(name: str) -> str:
    """The component a parameter of `Transformer` belongs to, from its qualified name."""
    if name.startswith("embed."):
        return "embedding"
    if name.startswith("lm_head."):
        return "lm_head"
    if ".attn." in name:
        return "attention"
    if name.endswith("norm.weight"):
        return "norms"
    for part, component in ((".mlp.router.", "router"), (".mlp.experts.", "experts"),
                            (".mlp.shared.", "shared_experts"), (".mlp.", "dense_mlp")):
        if part in name:
            return component
    raise ValueError(f"parameter {name!r} belongs to no known component; extend component_of")


def with_vocab(cfg: TrainConfig, vocab_size: int) -> TrainConfig:
    """`cfg` with `model.vocab_size` resolved (0 means the tokenizer's, which the caller knows)."""
    if cfg.model.vocab_size > 0:
        return cfg
    return replace(cfg, model=replace(cfg.model, vocab_size=vocab_size))


def with_tokenizer_vocab(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with `model.vocab_size` 0 resolved to `data.tokenizer`'s size (read only then)."""
    if cfg.model.vocab_size > 0:
        return cfg
    return with_vocab(cfg, get_tokenizer(cfg.data.tokenizer).n_vocab)


def build_meta_model(cfg: TrainConfig) -> Transformer:
    """The real model on the meta device: every shape, no storage."""
    with torch.device("meta"):
        return Transformer(cfg.model, cfg.expert, cfg.loss)


def count_by_component(model: nn.Module, top_k: int, num_experts: int) -> dict[str, dict[str, int]]:
    """{component: {"total": n, "active": n}}; an expert weight (E, a, b) is active k/E of it.

    Works on a plain, meta or parallelised model (DTensor parameters count their global shape).
    """
    table = {c: {"total": 0, "active": 0} for c in COMPONENTS}
    for name, p in model.named_parameters():
        comp = component_of(name)
        n = p.numel()
        table[comp]["total"] += n
        table[comp]["active"] += n * top_k // num_experts if comp == "experts" else n
    return table


def totals(table: dict[str, dict[str, int]]) -> dict[str, int]:
    """Total and active parameters summed over components."""
    return {key: sum(row[key] for row in table.values()) for key in ("total", "active")}


def flops_per_token(cfg: TrainConfig, table: dict[str, dict[str, int]],
                    causal: bool = True) -> dict[str, float]:
    """Training FLOPs per token (forward + backward = 3 x forward), by part.

    - matmuls: 2 FLOPs per active weight per token in the forward, for every weight that multiplies
      activations (attention projections, MLPs, router, the k experts a token visits, LM head);
      the embedding lookup is free, and a tied embedding is used once more as the LM head.
    - attention: QK^T and AV, 2 * 2 * n_heads * head_dim FLOPs per attended key; causal attention
      attends to (S + 1) / 2 keys on average (what a FlashAttention kernel computes).
    Activation-checkpoint recomputation is not counted: these are model FLOPs, what MFU divides.
    `table` counts a shared block's weights once (`model.share_layers`); they are used once per
    applied layer, so their matmuls count share_layers times.
    """
    m = cfg.model
    head = m.vocab_size * m.d_model
    # a block shared by share_layers applied layers multiplies activations that many times
    reuse = {c: 1 if c in ("embedding", "lm_head") else m.share_layers for c in table}
    matmul_weights = {c: row["active"] * reuse[c] for c, row in table.items()
                      if c not in ("embedding", "norms")}
    if m.tie_embeddings:
        matmul_weights["lm_head"] = head
    out = {f"{c}_matmuls": 6.0 * n for c, n in matmul_weights.items() if n}
    keys = (cfg.data.seq_len + 1) / 2 if causal else cfg.data.seq_len
    attn_width = m.n_heads * m.head_width
    out["attention_scores"] = 3.0 * m.n_layers * 4.0 * attn_width * keys
    out["total"] = sum(out.values())
    return out


def layer_counts(cfg: TrainConfig) -> dict[str, int]:
    """How many applied layers are MoE and how many dense, and how many distinct blocks hold
    weights (fewer under `model.share_layers`)."""
    n_moe = sum(is_moe_layer(i, cfg.model) for i in range(cfg.model.n_layers))
    return {"moe_layers": n_moe, "dense_layers": cfg.model.n_layers - n_moe,
            "distinct_blocks": cfg.model.n_layers // cfg.model.share_layers}
