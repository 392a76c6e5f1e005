"""`expert.router=expert_choice` (Zhou et al. 2022): each expert picks its top-C tokens of the batch.

Legend: T tokens, E experts, C tokens per expert, M = E*C picked assignments.
"""

from __future__ import annotations

import math

import torch

from moe_lm.model.dispatch import Dispatcher
from moe_lm.model.routers.base import Router, softmax_over_experts
from moe_lm.model.routing import Routing


class ExpertChoice(Router):
    """Softmax over experts; each expert takes the C tokens of the batch that score highest for
    it, C = ceil(capacity_factor * T * k / E); weights are the softmax scores.

    Balanced by construction: no balance loss (its aux_loss term is a constant 0). A token's
    routing depends on the other tokens of the batch, later positions included, so it is not
    causal: the model can read the future through the routing in training, and autoregressive
    decoding (one token at a time) routes differently from training.
    """

    def route(self, logits_TE: torch.Tensor) -> Routing:
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

    def balance_loss(self, routing: Routing, dispatcher: Dispatcher,
                     seq_len: int | None) -> torch.Tensor:
        return routing.logits_TE.new_zeros(())


def expert_choice_capacity(num_tokens: int, num_experts: int, top_k: int,
                           capacity_factor: float) -> int:
    """Tokens each expert takes under expert choice: ceil(cf * T * k / E), at most T, at least 1."""
    return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))
