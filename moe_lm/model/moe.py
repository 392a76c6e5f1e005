"""The sparse MoE layer: router -> dispatch (sort by expert) -> experts (grouped GEMM) -> combine.

Legend: T tokens, k experts per token, M rows in expert order, E experts, D model width,
F expert hidden size. Three seams, each an object the layer is given: the router
(`expert.router`, moe_lm.model.routers), the backend that runs route/gather/scatter/grouped_mm
(`expert.backend`, moe_lm.ops) and the dispatcher that moves rows to the experts and back
(moe_lm.model.dispatch; replaced by `set_dispatcher` when the layer is parallelized or planned).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from moe_lm.config import ExpertConfig, LossConfig
from moe_lm.model.dispatch import Dispatcher, LocalDispatcher
from moe_lm.model.router_losses import router_entropy
from moe_lm.model.routers import build_router
from moe_lm.model.terms import Terms
from moe_lm.ops import ExpertBackend, get_backend


@dataclass
class MoEStats:
    """What one MoE layer reports for a forward pass: its losses and its routing balance."""

    terms: Terms  # the layer's named loss terms (aux_loss: balance, z_loss: router z-loss)
    tokens_per_expert: torch.Tensor  # (E,) assignments routed to each expert (before drops)
    dropped_frac: torch.Tensor  # scalar, share of assignments dropped by capacity
    entropy: torch.Tensor  # scalar, mean router entropy


def local_block(w: torch.Tensor) -> torch.Tensor:
    """This rank's block of a weight split by expert parallelism (a DTensor), differentiably;
    a plain tensor unchanged."""
    return w.to_local() if isinstance(w, DTensor) else w


class Experts(nn.Module):
    """E SwiGLU experts held as 3-D weights: w1/w3 (E, D, F) and w2 (E, F, D)."""

    def __init__(self, num_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w3_EDF = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, hidden, d_model))

    def forward(self, x_MD: torch.Tensor, offs_E: torch.Tensor,
                backend: ExpertBackend) -> torch.Tensor:
        dtype = x_MD.dtype
        w1, w3, w2 = (local_block(w).to(dtype) for w in (self.w1_EDF, self.w3_EDF, self.w2_EFD))
        a_MF, b_MF = backend.grouped_mm_pair(x_MD, w1, w3, offs_E)
        return backend.grouped_mm(F.silu(a_MF) * b_MF, w2, offs_E)  # (M, D)


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP: w2(silu(w1 x) * w3 x). Used by dense layers and shared experts."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Routed experts (+ optional shared experts).

    The router decides (token choice: top-k per token, dropless or with a capacity in training;
    expert choice: C tokens per expert, see moe_lm.model.routers), the dispatcher runs the
    experts on the routed rows, the shared experts see every token. `dispatcher` defaults to
    `LocalDispatcher` (one process holds every expert).
    """

    def __init__(self, d_model: int, cfg: ExpertConfig, loss_cfg: LossConfig,
                 dispatcher: Dispatcher | None = None):
        super().__init__()
        self.cfg, self.loss_cfg = cfg, loss_cfg
        self.router = build_router(d_model, cfg, loss_cfg)
        self.experts = Experts(cfg.num_experts, d_model, cfg.hidden_size)
        self.shared = SwiGLU(d_model, cfg.hidden_size * cfg.num_shared) if cfg.num_shared else None
        self.backend = get_backend(cfg.backend)
        self.dispatcher = dispatcher or LocalDispatcher()

    def set_dispatcher(self, dispatcher: Dispatcher) -> None:
        """How the routed rows reach the experts from now on (parallelize and planning call it)."""
        self.dispatcher = dispatcher

    def forward(self, x_BSD: torch.Tensor,
                with_stats: bool = True) -> tuple[torch.Tensor, MoEStats | None]:
        """The layer's output and its stats (None with `with_stats=False`: generation reads
        neither the loss terms nor the balance, so it skips computing them)."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing = self.router(x_TD)
        out_TD, groups = self.dispatcher.dispatch(routing, x_TD.to(compute_dtype(x_TD)),
                                                  self.experts, self.backend)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        if not with_stats:
            return out_TD.reshape(B, S, D), None
        stats = MoEStats(
            terms=self.router.loss_terms(routing, self.dispatcher, S),
            tokens_per_expert=groups.tokens_E.detach(),
            dropped_frac=groups.dropped_frac,
            entropy=router_entropy(routing.probs_TE.detach()),
        )
        return out_TD.reshape(B, S, D), stats


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts run in: autocast's where autocast is on (grouped GEMMs are not
    autocast ops, so an fp32 residual stream would otherwise run them in fp32), else x's."""
    device_type = x.device.type
    if device_type == "meta":  # no autocast on meta (dry runs, planning): shapes only
        return x.dtype
    if torch.is_autocast_enabled(device_type) and x.is_floating_point():
        return torch.get_autocast_dtype(device_type)
    return x.dtype
