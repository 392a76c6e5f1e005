"""Routers and their losses: which experts each token goes to, with what weight.

Token choice (`expert.router=softmax|sigmoid`): each token picks its top-k experts.
Expert choice (`expert.router=expert_choice`): each expert picks its top-C tokens of the batch.
Aux-loss-free balancing (`expert.bias_update_rate > 0`): a per-expert bias shifts selection only
and is nudged after each optimizer step from the observed load (`update_score_bias`).

Legend: T tokens, E experts, k experts per token, C tokens per expert, D model width,
M kept assignments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moe_lm.config import ExpertConfig


@dataclass
class Routing:
    """A router's decision for T tokens.

    Token choice: `expert_idx_Tk`/`weights_Tk` hold k assignments per token and `order_M` is None
    (the backend's `route` sorts them). Expert choice: k = E, assignment t*E + e is token t at
    expert e, `weights_Tk` is (T, E) with zeros where expert e did not pick token t, and `order_M`
    lists only the picked assignments sorted by expert, with `counts_E` = C for every expert.
    """

    expert_idx_Tk: torch.Tensor  # int64 expert of each assignment
    weights_Tk: torch.Tensor  # fp32 combine weight of each assignment
    probs_TE: torch.Tensor  # fp32 router probabilities (what the balance loss sees)
    logits_TE: torch.Tensor  # fp32 raw router logits (what the z-loss sees)
    order_M: Optional[torch.Tensor] = None  # expert choice: picked assignments, by expert
    counts_E: Optional[torch.Tensor] = None  # expert choice: tokens per expert (all C)


class Router(nn.Module):
    """Linear gate + score function + selection.

    softmax: softmax over experts, top-k, the k weights renormalised to sum to 1 (with
        `norm_topk_prob=False`: the k softmax scores as they are, as OLMoE and Qwen3-MoE do).
    sigmoid: per-expert sigmoid scores, top-k, the k weights normalised (DeepSeek-V3).
    expert_choice: softmax over experts; each expert takes the C tokens of the batch that score
        highest for it, C = ceil(capacity_factor * T * k / E); weights are the softmax scores.
    A per-expert `score_bias` (aux-loss-free balancing) shifts selection only, never the weights.
    """

    def __init__(self, d_model: int, cfg: ExpertConfig):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.score_fn, self.jitter = cfg.router, cfg.jitter
        self.capacity_factor = cfg.capacity_factor
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate = nn.Linear(d_model, cfg.num_experts, bias=False)
        self.register_buffer("score_bias", torch.zeros(cfg.num_experts), persistent=True)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        if self.training and self.jitter > 0:  # Switch: multiplicative noise on the router input
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_TD = x_TD * noise
        logits_TE = self.gate(x_TD).float()
        if self.score_fn == "expert_choice":
            return self._expert_choice(logits_TE)
        if self.score_fn == "sigmoid":
            scores_TE = torch.sigmoid(logits_TE)
            probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        else:
            scores_TE = probs_TE = softmax_over_experts(logits_TE)
        select_TE = scores_TE + self.score_bias  # bias moves selection, not the weights
        expert_idx_Tk = select_TE.topk(self.top_k, dim=-1).indices
        top_Tk = scores_TE.gather(-1, expert_idx_Tk)
        weights_Tk = top_Tk
        if self.norm_topk_prob:  # OLMoE / Qwen3-MoE keep the raw softmax scores (False)
            weights_Tk = top_Tk / top_Tk.sum(-1, keepdim=True).clamp_min(1e-20)
        return Routing(expert_idx_Tk, weights_Tk, probs_TE, logits_TE)

    def _expert_choice(self, logits_TE: torch.Tensor) -> Routing:
        T, E = logits_TE.shape
        probs_TE = softmax_over_experts(logits_TE)
        C = expert_choice_capacity(T, E, self.top_k, self.capacity_factor)
        token_CE = probs_TE.topk(C, dim=0).indices.sort(dim=0).values  # each expert's C tokens
        experts_E = torch.arange(E, device=logits_TE.device)
        order_M = (token_CE * E + experts_E).t().reshape(-1)  # (E*C,) grouped by expert
        picked_TE = torch.zeros_like(probs_TE).scatter_(0, token_CE, 1.0)  # picked[t, e] = 1
        weights_TE = probs_TE * picked_TE  # zero where the expert did not pick the token
        counts_E = torch.full((E,), C, dtype=torch.int64, device=logits_TE.device)
        return Routing(experts_E.expand(T, E), weights_TE, probs_TE, logits_TE, order_M, counts_E)


def softmax_over_experts(logits_TE: torch.Tensor) -> torch.Tensor:
    """Softmax over the experts (the last dim). On CPU taken over dim 0 of the (E, T) view:
    torch's CPU softmax over a short last dim is far slower than over a strided one (T=4096,
    E=8: 600 vs 70 us forward, 870 vs 230 us with the backward)."""
    if logits_TE.device.type == "cpu" and logits_TE.dim() == 2:
        return torch.softmax(logits_TE.t(), dim=0).t()
    return torch.softmax(logits_TE, dim=-1)


def expert_choice_capacity(num_tokens: int, num_experts: int, top_k: int,
                           capacity_factor: float) -> int:
    """Tokens each expert takes under expert choice: ceil(cf * T * k / E), at most T, at least 1."""
    return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


@torch.no_grad()
def update_score_bias(router: Router, load_E: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing (DeepSeek-V3): b_e += rate * sign(mean load - load_e).

    Underloaded experts get a larger bias (picked more often), overloaded ones a smaller; the bias
    only shifts top-k selection, so this runs outside the gradient, after the optimizer step.
    """
    load_E = load_E.to(router.score_bias.device, torch.float32)
    router.score_bias += rate * torch.sign(load_E.mean() - load_E)


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
