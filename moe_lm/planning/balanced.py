"""Balanced routing for shape-only passes (meta or fake tensors): what planning assumes.

A meta or fake tensor has a shape but no values, so the data-dependent steps of the MoE layer
cannot run: how many tokens each expert gets (`route`'s counts), the all-to-all split sizes, the
per-expert loop of a grouped GEMM. The planner and the dry run give every MoE layer a balanced
dispatcher (`use_balanced_routing`) that replaces exactly those with the balanced case (every
expert gets T*k/E rows, every EP rank sends and receives the same number of rows); everything
else runs the real layers.

- `BalancedBackend`: balanced `route`, a shape-only `grouped_mm` (same output and saved tensors
  as the real one), the torch backend's gather/scatter; whatever `expert.backend` says.
- `BalancedDispatcher` (one process) and `BalancedExpertParallelDispatcher` (split sizes from
  shapes) run the layer on it.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_lm.model import MoE
from moe_lm.model.dispatch import Dispatcher, LocalDispatcher
from moe_lm.model.routing import ExpertGroups, Routing
from moe_lm.ops import ExpertBackend, torch_backend
from moe_lm.parallel.expert_parallel import ExpertParallelDispatcher


def balanced_counts(num_rows: int, num_experts: int, device) -> torch.Tensor:
    """(E,) rows per expert as even as possible: the first `num_rows % E` experts get one more."""
    base, extra = divmod(num_rows, num_experts)
    counts = [base + (1 if e < extra else 0) for e in range(num_experts)]
    return torch.tensor(counts, dtype=torch.int64).to(device)


class _ShapeOnlyGroupedMM(torch.autograd.Function):
    """(T, K) x (E, K, N) -> (T, N) without values; saves x and w like the real grouped GEMM."""

    @staticmethod
    def forward(ctx, x_TK, w_EKN, offs_E):
        ctx.save_for_backward(x_TK, w_EKN)
        return x_TK.new_empty((x_TK.shape[0], w_EKN.shape[2]))

    @staticmethod
    def backward(ctx, grad_TN):
        x_TK, w_EKN = ctx.saved_tensors
        return x_TK.new_empty(x_TK.shape), w_EKN.new_empty(w_EKN.shape), None


class BalancedBackend(ExpertBackend):
    """The kernel API for tensors without values, routing balanced."""

    name = "balanced"

    def route(self, expert_idx_Tk: torch.Tensor, num_experts: int):
        flat = expert_idx_Tk.reshape(-1)
        order = torch.sort(flat, stable=True).indices
        # a CPU tensor of known values, moved to the shape-only device
        return order, balanced_counts(flat.numel(), num_experts, flat.device)

    gather = staticmethod(torch_backend.gather)
    scatter = staticmethod(torch_backend.scatter)

    def grouped_mm(self, x_TK, w_EKN, offs_E):
        return _ShapeOnlyGroupedMM.apply(x_TK, w_EKN, offs_E)


class _OnBalancedBackend(Dispatcher):
    """Runs the dispatch on `BalancedBackend` whatever backend the layer has."""

    balanced = BalancedBackend()

    def dispatch(self, routing: Routing, x_TD: torch.Tensor, experts: nn.Module,
                 backend: ExpertBackend) -> tuple[torch.Tensor, ExpertGroups]:
        return super().dispatch(routing, x_TD, experts, self.balanced)


class BalancedDispatcher(_OnBalancedBackend, LocalDispatcher):
    """One process, routing balanced."""


class BalancedExpertParallelDispatcher(_OnBalancedBackend, ExpertParallelDispatcher):
    """Expert parallelism with balanced split sizes: every EP rank sends rows/P to each peer."""

    def _exchange_counts(self, send_PE: torch.Tensor) -> torch.Tensor:
        return send_PE.clone()  # balanced and symmetric: what each peer sends me is what I send

    def _splits(self, send_PE, recv_PE, rows: int) -> tuple[list[int], list[int]]:
        even = [rows // self.ep_size] * self.ep_size
        even[-1] += rows - sum(even)
        return even, even


def balanced(dispatcher: Dispatcher) -> Dispatcher:
    """The balanced counterpart of a layer's dispatcher (the same process groups)."""
    if isinstance(dispatcher, _OnBalancedBackend):
        return dispatcher
    if isinstance(dispatcher, ExpertParallelDispatcher):
        return BalancedExpertParallelDispatcher(dispatcher.num_experts, dispatcher.dp_group,
                                                dispatcher.ep_group)
    return BalancedDispatcher()


def use_balanced_routing(model: nn.Module) -> None:
    """Gives every MoE layer the balanced dispatcher of the one it has (call after
    `parallelize`)."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.set_dispatcher(balanced(module.dispatcher))
