"""The kernel API written the plain way: slow, obviously correct, the oracle of the tests.

Legend: T tokens, k assignments per token, M kept assignments (<= T*k), E experts, D/K/N widths.

No custom autograd and no fast paths: a loop over experts, indexing, `index_add`, a loop of
matmuls; autograd differentiates every step. Every backend (torch, triton, megablocks) is tested
against these functions. `order` may omit assignments (capacity dropping, expert choice); it has
no padding entries (the torch backend's aligned groups are checked against its unaligned ones).
"""

from __future__ import annotations

import torch

from moe_lm.ops.backend import ExpertBackend


def route(expert_idx_Tk: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's assignments in assignment order, expert after expert; (order (T*k,), counts (E,))."""
    flat_A = expert_idx_Tk.reshape(-1)
    rows = [torch.nonzero(flat_A == e).reshape(-1) for e in range(num_experts)]
    counts_E = torch.tensor([r.numel() for r in rows], dtype=torch.long, device=flat_A.device)
    order_A = torch.cat(rows) if rows else flat_A.new_zeros(0, dtype=torch.long)
    return order_A.long(), counts_E


def gather(x_TD: torch.Tensor, order_M: torch.Tensor, top_k: int) -> torch.Tensor:
    """Row m is the token of assignment order[m]: x[order // k]."""
    return x_TD[torch.div(order_M, top_k, rounding_mode="floor")]


def scatter(y_MD: torch.Tensor, order_M: torch.Tensor, weights_Tk: torch.Tensor) -> torch.Tensor:
    """out[t] = sum over the rows m of token t of (weight of assignment order[m]) * y[m]."""
    T, k = weights_Tk.shape
    token_M = torch.div(order_M, k, rounding_mode="floor")
    w_M = weights_Tk.reshape(-1)[order_M].to(y_MD.dtype)
    return y_MD.new_zeros(T, y_MD.shape[1]).index_add(0, token_M, y_MD * w_M[:, None])


def grouped_mm(x_TK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Rows offs[e-1]:offs[e] of x times w[e], one matmul per expert; zeros past offs[-1]."""
    pieces, start = [], 0
    for e, end in enumerate(offs_E.tolist()):
        pieces.append(x_TK[start:end] @ w_EKN[e])
        start = end
    pieces.append(x_TK.new_zeros(x_TK.shape[0] - start, w_EKN.shape[2]))
    return torch.cat(pieces)


class ReferenceBackend(ExpertBackend):
    """This module behind the backend seam (tests run whole MoE layers on it)."""

    name = "reference"
    route = staticmethod(route)
    gather = staticmethod(gather)
    scatter = staticmethod(scatter)
    grouped_mm = staticmethod(grouped_mm)
