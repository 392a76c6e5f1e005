"""The backend seam: what the MoE layer asks of `expert.backend`, as one abstract class.

Legend: T tokens, k assignments per token, M rows in expert order, E experts, D/K/N widths.

The kernel API is the four abstract methods: `route`, `gather`,
`scatter`, `grouped_mm`. The two composite methods have generic bodies here that a backend may
replace with something faster: the torch backend pads expert groups to aligned row counts in
`route_for_layer` and runs the SwiGLU's w1/w3 products with one backward in `grouped_mm_pair`.
The layer calls all six and never asks what a backend can do.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class ExpertBackend(ABC):
    """Dispatch and expert GEMMs for one `expert.backend`; every method works on autograd tensors."""

    name: str = ""

    @abstractmethod
    def route(self, expert_idx_Tk: torch.Tensor,
              num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stable sort of the flattened assignments by expert; returns (order (T*k,), counts (E,))."""

    @abstractmethod
    def gather(self, x_TD: torch.Tensor, order_M: torch.Tensor, top_k: int) -> torch.Tensor:
        """Rows of x in expert order, each token repeated per assignment: (M, D) = x[order // k]."""

    @abstractmethod
    def scatter(self, y_MD: torch.Tensor, order_M: torch.Tensor,
                weights_Tk: torch.Tensor) -> torch.Tensor:
        """Back to token order with the combine: out[t] = sum_j w[t, j] * y[pos(t*k + j)]; (T, D)."""

    @abstractmethod
    def grouped_mm(self, x_TK: torch.Tensor, w_EKN: torch.Tensor,
                   offs_E: torch.Tensor) -> torch.Tensor:
        """`torch._grouped_mm` semantics for 2D x 3D: rows offs[e-1]:offs[e] of x times w[e]."""

    def route_for_layer(self, expert_idx_Tk: torch.Tensor, num_experts: int,
                        may_pad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order, rows per expert group, assignments per expert) for one MoE layer.

        `may_pad`: the caller accepts padding entries in `order` (values >= T*k, zero rows after
        each group that `gather` fills and `scatter` ignores). Without padding (this default) the
        group rows are the assignment counts."""
        order_M, counts_E = self.route(expert_idx_Tk, num_experts)
        return order_M, counts_E, counts_E

    def grouped_mm_pair(self, x_TK: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor,
                        offs_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(grouped_mm(x, w_a, offs), grouped_mm(x, w_b, offs)): the SwiGLU's w1 and w3."""
        return self.grouped_mm(x_TK, w_a, offs_E), self.grouped_mm(x_TK, w_b, offs_E)
