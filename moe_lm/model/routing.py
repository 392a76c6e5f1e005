"""What a router decides (`Routing`) and how that becomes rows grouped by expert (`ExpertGroups`).

Legend: T tokens, k assignments per token, M rows in expert order (kept assignments, plus any
padding rows of the backend), E experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moe_lm.ops import ExpertBackend


@dataclass
class ExpertGroups:
    """A batch's rows sorted by expert: what gather, the experts and scatter run on."""

    order_M: torch.Tensor  # assignment of each row (padding entries >= T*k, where the backend pads)
    rows_E: torch.Tensor  # rows in each expert's group (padding included)
    tokens_E: torch.Tensor  # assignments routed to each expert, before capacity drops
    dropped_frac: torch.Tensor  # scalar: share of assignments (or tokens) no expert processes


@dataclass
class Routing:
    """A router's decision for T tokens.

    Token choice: `expert_idx_Tk`/`weights_Tk` hold k assignments per token and `order_M` is None
    (the backend's `route_for_layer` sorts them); `capacity` (training with a capacity factor)
    keeps at most that many assignments per expert. Expert choice: k = E, assignment t*E + e is
    token t at expert e, `weights_Tk` is (T, E) with zeros where expert e did not pick token t,
    and `order_M` lists only the picked assignments sorted by expert, with `counts_E` = C for
    every expert.
    """

    expert_idx_Tk: torch.Tensor  # int64 expert of each assignment
    weights_Tk: torch.Tensor  # fp32 combine weight of each assignment
    probs_TE: torch.Tensor  # fp32 router probabilities (what the balance loss sees)
    logits_TE: torch.Tensor  # fp32 raw router logits (what the z-loss sees)
    order_M: Optional[torch.Tensor] = None  # expert choice: picked assignments, by expert
    counts_E: Optional[torch.Tensor] = None  # expert choice: tokens per expert (all C)
    capacity: Optional[int] = None  # token choice: assignments kept per expert (None: all)

    @property
    def top_k(self) -> int:
        """Assignments per token (E under expert choice)."""
        return self.weights_Tk.shape[1]

    def expert_groups(self, backend: ExpertBackend, may_pad: bool) -> ExpertGroups:
        """The rows of this routing grouped by expert. `may_pad`: the dispatcher keeps the rows
        on this process, so the backend may pad its groups (dropless token choice only)."""
        if self.order_M is not None:  # already picked and sorted by the router
            dropped = (self.weights_Tk == 0).all(-1).float().mean()  # tokens no expert took
            return ExpertGroups(self.order_M, self.counts_E, self.counts_E, dropped)
        num_experts = self.probs_TE.shape[-1]
        order_M, rows_E, tokens_E = backend.route_for_layer(
            self.expert_idx_Tk, num_experts, may_pad and self.capacity is None)
        dropped = self.weights_Tk.new_zeros((), dtype=torch.float32)
        if self.capacity is not None:
            order_M, rows_E = drop_over_capacity(order_M, rows_E, self.capacity)
            dropped = torch.tensor(1.0 - order_M.numel() / self.expert_idx_Tk.numel())
        return ExpertGroups(order_M, rows_E, tokens_E, dropped)


def drop_over_capacity(order_M: torch.Tensor, counts_E: torch.Tensor,
                       capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keeps the first `capacity` assignments of each expert (token order); the rest are dropped."""
    starts_E = counts_E.cumsum(0) - counts_E
    expert_of_M = torch.repeat_interleave(torch.arange(counts_E.numel(), device=counts_E.device),
                                          counts_E)
    rank_M = torch.arange(order_M.numel(), device=order_M.device) - starts_E[expert_of_M]
    keep_M = rank_M < capacity
    return order_M[keep_M], counts_E.clamp(max=capacity)
