"""The decoder-only transformer: embed -> [attention -> (dense MLP | MoE)] x L -> norm -> LM head.

With `model.share_layers=N` (cross-layer sharing, ALBERT / MoEUT) `layers` holds the L / N
distinct blocks and applied layer i runs block i // N: a shared weight is one parameter, so
state dicts, checkpoints, FSDP wrapping and parameter counts see it once, while the KV cache,
routing stats and FLOPs are per applied layer.

Legend: B batch, S sequence, D model width, H query heads, G key/value heads, Dh head width,
V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_lm.config import ExpertConfig, LossConfig, ModelConfig, check_layer_sharing
from moe_lm.model.losses import fused_linear_cross_entropy
from moe_lm.model.moe import MoE, MoEStats, SwiGLU
from moe_lm.model.routers import Router
from moe_lm.model.terms import Terms, mean_terms


@dataclass
class ModelOutput:
    """Logits (when asked for), the LM loss (when targets were given), each MoE layer's stats
    and their loss terms averaged over the layers (what the training step adds to the LM loss)."""

    logits: torch.Tensor | None
    lm_loss: torch.Tensor | None
    moe_stats: list[MoEStats]
    hidden: torch.Tensor | None = None  # (B, S, D) final normed hidden states (extra objectives)

    @property
    def terms(self) -> Terms:
        return mean_terms([s.terms for s in self.moe_stats])


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale, computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def rotary_tables(seq_len: int, head_dim: int, theta: float, device=None) -> torch.Tensor:
    """cos/sin tables for rotary positions, (S, Dh/2, 2) in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles_SF = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    return torch.stack([angles_SF.cos(), angles_SF.sin()], dim=-1)


def apply_rotary(x_BSHD: torch.Tensor, rope_SF2: torch.Tensor) -> torch.Tensor:
    """Rotates consecutive pairs of each head's channels by position-dependent angles.

    As one complex multiply, (x0 + i x1) * (cos + i sin), in fp32: one pass instead of the six
    of the real-arithmetic form, forward and backward."""
    x_BSHF = torch.view_as_complex(x_BSHD.float().reshape(*x_BSHD.shape[:-1], -1, 2))
    rot = torch.view_as_complex(rope_SF2.contiguous())  # (S, F), or (B, S, F): per-row positions
    rot_BS1F = rot[None, :, None, :] if rot.dim() == 2 else rot[:, :, None, :]
    return torch.view_as_real(x_BSHF * rot_BS1F).flatten(-2).to(x_BSHD.dtype)


class Attention(nn.Module):
    """Causal grouped-query self-attention through `scaled_dot_product_attention`.

    Switches for imported architectures (all off by default): `qk_norm=head` RMS-normalises each
    head's query and key (Qwen3-MoE), `qk_norm=proj` the whole query and key projections (OLMoE),
    both before rotary; `clip_qkv > 0` clamps q, k, v after that (OLMoE's `clip_qkv`).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.head_width
        self.clip_qkv = cfg.clip_qkv
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * self.head_dim, bias=False)
        self.wkv = nn.Linear(cfg.d_model, 2 * cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = RMSNorm(self.head_dim if per_head else cfg.n_heads * self.head_dim,
                                  cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim if per_head else cfg.n_kv_heads * self.head_dim,
                                  cfg.norm_eps)

    def _project(self, x_BSD: torch.Tensor):
        """q (B, S, H, Dh), k and v (B, S, G, Dh), normed and clipped as configured."""
        B, S, _ = x_BSD.shape
        q_BSX = self.wq(x_BSD)
        k_BSY, v_BSY = self.wkv(x_BSD).view(B, S, 2, -1).unbind(2)
        if self.qk_norm == "proj":
            q_BSX, k_BSY = self.q_norm(q_BSX), self.k_norm(k_BSY)
        q_BSHD = q_BSX.view(B, S, self.n_heads, self.head_dim)
        k_BSGD = k_BSY.view(B, S, self.n_kv_heads, self.head_dim)
        v_BSGD = v_BSY.view(B, S, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q_BSHD, k_BSGD = self.q_norm(q_BSHD), self.k_norm(k_BSGD)
        if self.clip_qkv > 0:
            c = self.clip_qkv
            q_BSHD, k_BSGD, v_BSGD = (t.clamp(-c, c) for t in (q_BSHD, k_BSGD, v_BSGD))
        return q_BSHD, k_BSGD, v_BSGD

    def forward(self, x_BSD: torch.Tensor, rope_SF2: torch.Tensor, cache=None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q_BSHD, k_BSGD, v_BSGD = self._project(x_BSD)
        q_BSHD, k_BSGD = apply_rotary(q_BSHD, rope_SF2), apply_rotary(k_BSGD, rope_SF2)
        mask_ST = None
        if cache is not None:  # generation: append to this layer's KV cache, attend to all of it
            k_BSGD, v_BSGD, mask_ST = cache.update(k_BSGD, v_BSGD)
        y_BHSD = F.scaled_dot_product_attention(
            q_BSHD.transpose(1, 2), k_BSGD.transpose(1, 2), v_BSGD.transpose(1, 2),
            attn_mask=mask_ST, is_causal=mask_ST is None,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.wo(y_BHSD.transpose(1, 2).reshape(B, S, -1))


class Block(nn.Module):
    """Pre-norm transformer block whose MLP is either dense SwiGLU or a sparse MoE."""

    def __init__(self, cfg: ModelConfig, expert_cfg: ExpertConfig, loss_cfg: LossConfig,
                 is_moe: bool):
        super().__init__()
        self.is_moe = is_moe
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoE(cfg.d_model, expert_cfg, loss_cfg) if is_moe else SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x_BSD: torch.Tensor, rope_SF2: torch.Tensor, cache=None):
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), rope_SF2, cache)
        if self.is_moe:
            mlp_out, stats = self.mlp(self.mlp_norm(x_BSD), with_stats=cache is None)
            return x_BSD + mlp_out, stats
        return x_BSD + self.mlp(self.mlp_norm(x_BSD)), None


def is_moe_layer(layer: int, cfg: ModelConfig) -> bool:
    """Layers after the first `n_dense_layers` are MoE every `moe_every` layers."""
    return layer >= cfg.n_dense_layers and (layer - cfg.n_dense_layers) % cfg.moe_every == 0


def block_is_moe(cfg: ModelConfig) -> list[bool]:
    """Per distinct block (n_layers / share_layers of them), whether it is MoE: that of the
    applied layers it runs (`check_layer_sharing` makes a group all dense or all MoE)."""
    N = cfg.share_layers
    return [is_moe_layer(j * N, cfg) for j in range(cfg.n_layers // N)]


class Transformer(nn.Module):
    """The language model. `forward(tokens_BS, targets_BS)` returns a ModelOutput."""

    def __init__(self, cfg: ModelConfig, expert_cfg: ExpertConfig, loss_cfg: LossConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (the entry point takes the tokenizer's)")
        check_layer_sharing(cfg)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(  # the distinct blocks (all n_layers of them without sharing)
            Block(cfg, expert_cfg, loss_cfg, moe) for moe in block_is_moe(cfg)
        )
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def applied_layers(self) -> list[Block]:
        """The block each of the n_layers applied layers runs (repeats under share_layers)."""
        N = self.cfg.share_layers
        return [self.layers[i // N] for i in range(self.cfg.n_layers)]

    @property
    def head_weight_VD(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) everywhere; output projections scaled by 1/sqrt(2 * n_layers)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("wo.weight", "w2.weight", "w2_EFD")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)
        for module in self.modules():  # buffers that are state, not parameters
            if isinstance(module, Router):
                module.score_bias.zero_()

    def forward(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor | None = None,
                return_logits: bool = True, cache=None, last_only: bool = False) -> ModelOutput:
        """`cache` (moe_lm.inference.KVCache) continues a sequence from position `cache.length`;
        `last_only` computes the logits of the last position only (generation)."""
        S, head_dim = tokens_BS.shape[1], self.cfg.head_width
        if cache is None:
            rope_SF2 = rotary_tables(S, head_dim, self.cfg.rope_theta, tokens_BS.device)
        else:  # the cache knows each row's positions (left-padded batches)
            if len(cache.layers) != self.cfg.n_layers:
                raise ValueError(f"The KV cache has {len(cache.layers)} layers, the model applies "
                                 f"{self.cfg.n_layers} (model.share_layers={self.cfg.share_layers}"
                                 " repeats blocks): build the cache with model.cfg.n_layers.")
            rope_SF2 = cache.begin(S, head_dim, self.cfg.rope_theta, tokens_BS.device)
        x_BSD = self.embed(tokens_BS)
        stats: list[MoEStats] = []
        for i, layer in enumerate(self.applied_layers()):
            x_BSD, layer_stats = layer(x_BSD, rope_SF2, None if cache is None else cache.layers[i])
            if layer_stats is not None:
                stats.append(layer_stats)
        h_BSD = self.norm(x_BSD)
        if not return_logits and targets_BS is not None:  # training: never build (B*S, V) logits
            lm_loss = fused_linear_cross_entropy(h_BSD.flatten(0, 1), self.head_weight_VD,
                                                 targets_BS.flatten())
            return ModelOutput(None, lm_loss, stats, h_BSD)
        head_VD = self.head_weight_VD.to(h_BSD.dtype)
        if last_only:
            logits_BSV = few_rows_logits(h_BSD[:, -1], head_VD)[:, None]
        else:
            logits_BSV = F.linear(h_BSD, head_VD)
        lm_loss = None
        if targets_BS is not None:
            lm_loss = F.cross_entropy(logits_BSV.flatten(0, 1).float(), targets_BS.flatten())
        return ModelOutput(logits_BSV, lm_loss, stats, h_BSD)


def few_rows_logits(h_BD: torch.Tensor, head_VD: torch.Tensor) -> torch.Tensor:
    """The LM head for the few rows of a decoding step, (B, V): on CPU as `head @ h.T`.

    MKL's product of one or a few rows with a transposed (V, D) weight, what `F.linear` runs,
    streams the weight far below memory bandwidth on some x86 CPUs; with the weight as the
    left operand it reads it at full speed (measured in experiments/results/
    bench_generate_2026-12-02.md). A single row goes in twice: a one-column right operand
    takes MKL's slow matrix-vector path again. Same products, summed in another order."""
    if h_BD.device.type != "cpu":
        return F.linear(h_BD, head_VD)
    B = h_BD.shape[0]
    h_RD = torch.cat([h_BD, h_BD]) if B == 1 else h_BD.contiguous()
    return (head_VD @ h_RD.t()).t()[:B]


def count_params(cfg: ModelConfig, expert_cfg: ExpertConfig) -> dict[str, int]:
    """Parameter counts from the architecture alone: total and active per token (a block shared
    by `share_layers` applied layers counts once: these are the weights, not the FLOPs)."""
    D, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers // cfg.share_layers  # distinct blocks
    hd = cfg.head_width
    attn = D * cfg.n_heads * hd + 2 * D * cfg.n_kv_heads * hd + cfg.n_heads * hd * D
    attn += {"none": 0, "head": 2 * hd, "proj": (cfg.n_heads + cfg.n_kv_heads) * hd}[cfg.qk_norm]
    norms = 2 * D
    dense_mlp = 3 * D * cfg.ffn_hidden
    E, F_, k = expert_cfg.num_experts, expert_cfg.hidden_size, expert_cfg.top_k
    one_expert = 3 * D * F_
    shared = one_expert * expert_cfg.num_shared
    n_moe = sum(block_is_moe(cfg))
    n_dense = L - n_moe
    embed = V * D * (1 if cfg.tie_embeddings else 2)
    common = embed + D + L * (attn + norms) + n_dense * dense_mlp + n_moe * (D * E + shared)
    return {
        "total": common + n_moe * E * one_expert,
        "active": common + n_moe * k * one_expert,
    }
