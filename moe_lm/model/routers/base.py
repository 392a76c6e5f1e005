"""What every router shares: the linear gate, jitter, the aux-free selection bias, the loss terms.

Legend: T tokens, E experts, k experts per token, D model width.

A router maps x (T, D) to a `Routing` (moe_lm.model.routing) and names its own loss terms
(`loss_terms`): the MoE layer runs whatever it is given and never asks which router it has.
Token-choice routers (`TopKRouter`) differ only in their score function and in how they pick the
k experts from the (biased) scores; expert choice (`ExpertChoice`) overrides the whole `route`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import nn

from moe_lm.config import ExpertConfig, LossConfig
from moe_lm.model.dispatch import Dispatcher
from moe_lm.model.router_losses import z_loss
from moe_lm.model.routing import Routing
from moe_lm.model.terms import LossTerm, Terms


class Router(nn.Module, ABC):
    """Linear gate (with Switch jitter in training) -> `route`; the balance and z-loss terms.

    A per-expert `score_bias` buffer (aux-loss-free balancing, `update_score_bias`) is part of
    every router's state, so checkpoints have the same keys whatever the router.
    """

    def __init__(self, d_model: int, cfg: ExpertConfig, loss_cfg: LossConfig):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.jitter, self.capacity_factor = cfg.jitter, cfg.capacity_factor
        self.aux_coef, self.z_coef = loss_cfg.aux_coef, loss_cfg.z_coef
        self.sequence_balance = loss_cfg.aux_type == "sequence"
        self.gate = nn.Linear(d_model, cfg.num_experts, bias=False)
        self.register_buffer("score_bias", torch.zeros(cfg.num_experts), persistent=True)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        if self.training and self.jitter > 0:  # Switch: multiplicative noise on the router input
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_TD = x_TD * noise
        return self.route(self.gate(x_TD).float())

    @abstractmethod
    def route(self, logits_TE: torch.Tensor) -> Routing:
        """The routing of T tokens from their fp32 gate logits."""

    def balance_loss(self, routing: Routing, dispatcher: Dispatcher,
                     seq_len: int | None) -> torch.Tensor:
        """Switch balance loss; its expert fractions f over the batch the dispatcher spans."""
        return dispatcher.balance_loss(routing.probs_TE, routing.expert_idx_Tk, seq_len)

    def loss_terms(self, routing: Routing, dispatcher: Dispatcher, seq_len: int) -> Terms:
        """The named terms this routing adds to the loss: aux_loss (balance) and z_loss."""
        balance = self.balance_loss(routing, dispatcher, seq_len if self.sequence_balance else None)
        return {"aux_loss": LossTerm(balance, self.aux_coef),
                "z_loss": LossTerm(z_loss(routing.logits_TE), self.z_coef)}

    @torch.no_grad()
    def update_score_bias(self, load_E: torch.Tensor, rate: float) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): b_e += rate * sign(mean load - load_e).

        Underloaded experts get a larger bias (picked more often), overloaded ones a smaller; the
        bias only shifts selection, so this runs outside the gradient, after the optimizer step.
        """
        load_E = load_E.to(self.score_bias.device, torch.float32)
        self.score_bias += rate * torch.sign(load_E.mean() - load_E)


class TopKRouter(Router):
    """Token choice: scores -> the k best (biased) experts per token -> their scores, normalised.

    Dropless, or in training with `capacity_factor > 0` at most ceil(cf * T * k / E) assignments
    per expert (`Routing.capacity`; the rest pass through the residual only).
    """

    @abstractmethod
    def scores(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, probabilities): what the weights come from, what the balance loss sees."""

    def select(self, biased_TE: torch.Tensor) -> torch.Tensor:
        """The k experts of each token, (T, k) int64, from scores plus the selection bias."""
        return biased_TE.topk(self.top_k, dim=-1).indices

    def combine_weights(self, top_Tk: torch.Tensor) -> torch.Tensor:
        """The k picked scores as combine weights: normalised to sum to 1."""
        return top_Tk / top_Tk.sum(-1, keepdim=True).clamp_min(1e-20)

    def route(self, logits_TE: torch.Tensor) -> Routing:
        T, E = logits_TE.shape
        scores_TE, probs_TE = self.scores(logits_TE)
        expert_idx_Tk = self.select(scores_TE + self.score_bias)  # bias moves selection only
        weights_Tk = self.combine_weights(scores_TE.gather(-1, expert_idx_Tk))
        capacity = None
        if self.training and self.capacity_factor > 0:
            capacity = math.ceil(self.capacity_factor * T * self.top_k / E)
        return Routing(expert_idx_Tk, weights_Tk, probs_TE, logits_TE, capacity=capacity)


def softmax_over_experts(logits_TE: torch.Tensor) -> torch.Tensor:
    """Softmax over the experts (the last dim). On CPU taken over dim 0 of the (E, T) view:
    torch's CPU softmax over a short last dim is several times slower than over a strided one
    (measured in experiments/results/cpu_bench_2026-11-26_session2.md)."""
    if logits_TE.device.type == "cpu" and logits_TE.dim() == 2:
        return torch.softmax(logits_TE.t(), dim=0).t()
    return torch.softmax(logits_TE, dim=-1)
