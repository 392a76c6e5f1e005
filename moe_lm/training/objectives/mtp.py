"""Multi-token prediction (DeepSeek-V3 style) as an auxiliary training objective.

Legend: B batch, S sequence, D model width.

Depth d (1..`loss.mtp_depth`) predicts the token d+1 places ahead. Module d takes the previous
depth's hidden state at position t (the trunk's final hidden state for d = 1) and the embedding of
token t+d, normalises both, projects their concatenation back to D, runs one dense transformer
block (causal attention + SwiGLU) and scores token t+d+1 through the model's own LM head. The
modules hang off the model as `model.mtp`, so the optimizer and checkpoints include them; eval,
generate and export load the trunk alone. The loss is the mean cross-entropy over depths,
added with weight `loss.mtp_coef`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_lm.config import ExpertConfig, LossConfig, ModelConfig
from moe_lm.model.losses import fused_linear_cross_entropy
from moe_lm.model.transformer import Block, RMSNorm, Transformer, rotary_tables


class MTPModule(nn.Module):
    """One prediction depth: [norm(h); norm(embed)] -> linear -> dense block -> norm."""

    def __init__(self, cfg: ModelConfig, expert_cfg: ExpertConfig, loss_cfg: LossConfig):
        super().__init__()
        self.norm_h = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.norm_e = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = Block(cfg, expert_cfg, loss_cfg, is_moe=False)
        self.norm_out = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, h_BSD: torch.Tensor, emb_BSD: torch.Tensor, rope_SF2: torch.Tensor):
        """Returns (the hidden state passed to the next depth, the normed state to score)."""
        z_BSD = self.proj(torch.cat([self.norm_h(h_BSD), self.norm_e(emb_BSD)], dim=-1))
        z_BSD, _ = self.block(z_BSD, rope_SF2)
        return z_BSD, self.norm_out(z_BSD)


class MTPHeads(nn.Module):
    """`depth` MTPModules applied in sequence; `loss(...)` is their mean cross-entropy."""

    def __init__(self, cfg: ModelConfig, expert_cfg: ExpertConfig, loss_cfg: LossConfig,
                 depth: int):
        super().__init__()
        self.cfg = cfg
        self.depths = nn.ModuleList(MTPModule(cfg, expert_cfg, loss_cfg) for _ in range(depth))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Like the trunk: Normal(0, init_std), output projections scaled, norms at 1."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm_h.weight") or name.endswith("norm_e.weight") or \
                    name.endswith("norm_out.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * (self.cfg.n_layers + 1)))
            else:
                nn.init.normal_(p, 0.0, std)

    def loss(self, model: Transformer, tokens_BS1: torch.Tensor,
             hidden_BSD: torch.Tensor) -> torch.Tensor:
        """Mean over depths of the cross-entropy of token t+d+1, from a `(B, S+1)` batch and the
        trunk's final hidden states `(B, S, D)` for inputs `tokens_BS1[:, :-1]`."""
        S = hidden_BSD.shape[1]
        h_BSD = hidden_BSD
        losses = []
        for d, module in enumerate(self.depths, start=1):
            if S - d < 1:
                break
            emb_BSD = model.embed(tokens_BS1[:, d:S])  # token t+d for t in [0, S-d)
            rope_SF2 = rotary_tables(S - d, self.cfg.d_model // self.cfg.n_heads,
                                     self.cfg.rope_theta, tokens_BS1.device)
            h_BSD, normed_BSD = module(h_BSD[:, :S - d], emb_BSD, rope_SF2)
            targets_BS = tokens_BS1[:, d + 1:S + 1]  # token t+d+1
            losses.append(fused_linear_cross_entropy(normed_BSD.flatten(0, 1),
                                                     model.head_weight_VD, targets_BS.flatten()))
        return torch.stack(losses).mean()
