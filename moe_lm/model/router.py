"""Top-k routers and their losses: which experts each token goes to, with what weight.

Legend: T tokens, E experts, k experts per token, D model width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_lm.config import ExpertConfig


@dataclass
class Routing:
    """A router's decision for T tokens."""

    expert_idx_Tk: torch.Tensor  # int64 expert of each assignment
    weights_Tk: torch.Tensor  # fp32 combine weight of each assignment
    probs_TE: torch.Tensor  # fp32 router probabilities (what the balance loss sees)
    logits_TE: torch.Tensor  # fp32 raw router logits (what the z-loss sees)


class Router(nn.Module):
    """Linear gate + score function + top-k selection.

    softmax: softmax over experts, top-k, the k weights renormalised to sum to 1.
    sigmoid: per-expert sigmoid scores, top-k, the k weights normalised (DeepSeek-V3).
    A per-expert `score_bias` (aux-loss-free balancing) shifts selection only, never the weights.
    """

    def __init__(self, d_model: int, cfg: ExpertConfig):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.score_fn, self.jitter = cfg.router, cfg.jitter
        self.gate = nn.Linear(d_model, cfg.num_experts, bias=False)
        self.register_buffer("score_bias", torch.zeros(cfg.num_experts), persistent=True)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_TD = x_TD * noise
        logits_TE = self.gate(x_TD).float()
        if self.score_fn == "sigmoid":
            scores_TE = torch.sigmoid(logits_TE)
            probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        else:
            scores_TE = probs_TE = torch.softmax(logits_TE, dim=-1)
        select_TE = scores_TE + self.score_bias  # bias moves selection, not the weights
        expert_idx_Tk = select_TE.topk(self.top_k, dim=-1).indices
        top_Tk = scores_TE.gather(-1, expert_idx_Tk)
        weights_Tk = top_Tk / top_Tk.sum(-1, keepdim=True).clamp_min(1e-20)
        return Routing(expert_idx_Tk, weights_Tk, probs_TE, logits_TE)


def load_balance_loss(probs_TE: torch.Tensor, expert_idx_Tk: torch.Tensor,
                      seq_len: int | None = None) -> torch.Tensor:
    """Switch load-balancing loss E * sum_i f_i * P_i: 1 when balanced, E when all on one expert.

    f_i is the fraction of assignments routed to expert i, P_i the mean router probability.
    With `seq_len`, f and P are taken per sequence and the loss averaged (sequence-level variant).
    """
    T, E = probs_TE.shape
    groups = 1 if seq_len is None else T // seq_len
    one_hot_GtkE = F.one_hot(expert_idx_Tk, E).float().reshape(groups, -1, E)
    f_GE = one_hot_GtkE.mean(1)
    P_GE = probs_TE.reshape(groups, -1, E).mean(1)
    return E * (f_GE * P_GE).sum(-1).mean()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared log-partition, keeps router logits small."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of the router distribution (nats); ln(E) is uniform."""
    return -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean()
