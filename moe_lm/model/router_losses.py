"""The routers' losses and statistics: Switch balance loss, z-loss, routing entropy.

Legend: T tokens, E experts, k experts per token, G groups (sequences).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
