"""Token dispatch: how a MoE layer's routed rows reach its experts and come back.

Legend: T tokens, M rows in expert order, E experts, D model width.

A `Dispatcher` is given to the layer when it is built (`LocalDispatcher`, one process) or when
it is parallelized (`moe_lm.parallel.ExpertParallelDispatcher`: experts split over ranks, rows
sent by all-to-all) or planned (`moe_lm.planning.balanced`: shape-only, routing balanced). It
decides what only it can know: whether the rows stay on this process (then the backend may pad
its expert groups), where the experts run, and over which batch the balance loss counts f.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from moe_lm.model.router_losses import load_balance_loss
from moe_lm.model.routing import ExpertGroups, Routing
from moe_lm.ops import ExpertBackend


class Dispatcher(ABC):
    """gather -> experts -> scatter for one MoE layer; `run_experts` and `balance_loss` vary."""

    pads_rows: bool = False  # the rows stay here: the backend may pad its expert groups

    def dispatch(self, routing: Routing, x_TD: torch.Tensor, experts: nn.Module,
                 backend: ExpertBackend) -> tuple[torch.Tensor, ExpertGroups]:
        """The routed experts' combined output (T, D) for x (in the experts' dtype), and the
        expert groups it ran."""
        groups = routing.expert_groups(backend, self.pads_rows)
        x_MD = backend.gather(x_TD, groups.order_M, routing.top_k)
        y_MD = self.run_experts(experts, x_MD, groups.rows_E, backend)
        out_TD = backend.scatter(y_MD, groups.order_M, routing.weights_Tk.to(y_MD.dtype))
        return out_TD, groups

    @abstractmethod
    def run_experts(self, experts: nn.Module, x_MD: torch.Tensor, rows_E: torch.Tensor,
                    backend: ExpertBackend) -> torch.Tensor:
        """y_MD = experts(x_MD), row block e (rows_E[e] rows) through expert e."""

    @abstractmethod
    def balance_loss(self, probs_TE: torch.Tensor, expert_idx_Tk: torch.Tensor,
                     seq_len: int | None) -> torch.Tensor:
        """The Switch balance loss of this routing (`seq_len`: per sequence)."""


class LocalDispatcher(Dispatcher):
    """One process holds every expert; the balance loss sees this process's batch."""

    pads_rows = True

    def run_experts(self, experts: nn.Module, x_MD: torch.Tensor, rows_E: torch.Tensor,
                    backend: ExpertBackend) -> torch.Tensor:
        return experts(x_MD, rows_E.cumsum(0).to(torch.int32), backend)

    def balance_loss(self, probs_TE: torch.Tensor, expert_idx_Tk: torch.Tensor,
                     seq_len: int | None) -> torch.Tensor:
        return load_balance_loss(probs_TE, expert_idx_Tk, seq_len)
