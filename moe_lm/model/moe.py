"""The sparse MoE layer: router -> dispatch (sort by expert) -> experts (grouped GEMM) -> combine.

Legend: T tokens, k experts per token, M kept assignments (<= T*k), E experts, D model width,
F expert hidden size. The backend (`expert.backend`) supplies route/gather/scatter/grouped_mm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_lm.config import ExpertConfig, LossConfig
from moe_lm.model.router import Router, load_balance_loss, router_entropy, z_loss
from moe_lm.model.terms import LossTerm, Terms
from moe_lm.ops import get_backend
from moe_lm.parallel.expert_parallel import local_tensor


@dataclass
class MoEStats:
    """What one MoE layer reports for a forward pass: its losses and its routing balance."""

    terms: Terms  # the layer's named loss terms (aux_loss: balance, z_loss: router z-loss)
    tokens_per_expert: torch.Tensor  # (E,) assignments routed to each expert (before drops)
    dropped_frac: torch.Tensor  # scalar, share of assignments dropped by capacity
    entropy: torch.Tensor  # scalar, mean router entropy


class Experts(nn.Module):
    """E SwiGLU experts held as 3-D weights: w1/w3 (E, D, F) and w2 (E, F, D)."""

    def __init__(self, num_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w3_EDF = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, hidden, d_model))

    def forward(self, x_MD: torch.Tensor, offs_E: torch.Tensor, backend) -> torch.Tensor:
        dtype = x_MD.dtype
        gmm = backend.grouped_mm
        # under expert parallelism the weights are DTensors split by expert: use this rank's block
        w1, w3, w2 = (local_tensor(w).to(dtype) for w in (self.w1_EDF, self.w3_EDF, self.w2_EFD))
        if hasattr(backend, "grouped_mm_pair"):  # the torch backend: one backward for both
            a_MF, b_MF = backend.grouped_mm_pair(x_MD, w1, w3, offs_E)
        else:
            a_MF, b_MF = gmm(x_MD, w1, offs_E), gmm(x_MD, w3, offs_E)
        return gmm(F.silu(a_MF) * b_MF, w2, offs_E)  # (M, D)


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

    Token choice (top-k) is dropless, or with `capacity_factor > 0` drops in training the
    assignments past each expert's capacity (those tokens pass through the residual only).
    Expert choice: each expert takes C tokens of the whole batch (see `Router`). Its routing of a
    token depends on the other tokens of the batch, later positions included, so it is not causal:
    the model can read the future through the routing in training, and autoregressive decoding
    (one token at a time) routes differently from training. It has no balance loss (it is
    balanced by construction); `dropped_frac` is the share of tokens no expert took.
    """

    def __init__(self, d_model: int, cfg: ExpertConfig, loss_cfg: LossConfig):
        super().__init__()
        self.cfg, self.loss_cfg = cfg, loss_cfg
        self.router = Router(d_model, cfg)
        self.experts = Experts(cfg.num_experts, d_model, cfg.hidden_size)
        self.shared = SwiGLU(d_model, cfg.hidden_size * cfg.num_shared) if cfg.num_shared else None
        self.backend = get_backend(cfg.backend)
        self.parallel = None  # a moe_lm.parallel.MoEParallel once parallelized across ranks

    def _route(self, expert_idx_Tk: torch.Tensor, x_TD: torch.Tensor):
        """(order, rows per expert group, assignments per expert). Where the backend can pad the
        groups to an aligned row count (the torch backend on CPU: faster GEMM tiles), dropless
        token choice on one process does; the padding rows are zeros that the combine ignores."""
        E, k = self.cfg.num_experts, self.cfg.top_k
        dropless = self.cfg.capacity_factor <= 0 or not self.training
        align = 1
        if hasattr(self.backend, "route_aligned") and dropless and self.parallel is None:
            align = self.backend.row_alignment(x_TD, k, E)
        if align > 1:
            return self.backend.route_aligned(expert_idx_Tk, E, align)
        order_M, counts_E = self.backend.route(expert_idx_Tk, E)
        return order_M, counts_E, counts_E

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        B, S, D = x_BSD.shape
        E, k = self.cfg.num_experts, self.cfg.top_k
        x_TD = x_BSD.reshape(B * S, D)
        routing = self.router(x_TD)
        dropped = x_TD.new_zeros((), dtype=torch.float32)
        if routing.order_M is not None:  # expert choice: the router already picked and sorted
            order_M, counts_E = routing.order_M, routing.counts_E
            k = E  # assignment t*E + e; the weights of unpicked ones are 0
            dropped = (routing.weights_Tk == 0).all(-1).float().mean()  # tokens no expert took
            tokens_per_expert = counts_E
        else:
            order_M, counts_E, tokens_per_expert = self._route(routing.expert_idx_Tk, x_TD)
        if self.cfg.capacity_factor > 0 and self.training and routing.order_M is None:
            capacity = math.ceil(self.cfg.capacity_factor * B * S * k / E)
            order_M, counts_E = drop_over_capacity(order_M, counts_E, capacity)
            dropped = 1.0 - order_M.numel() / (B * S * k)
            dropped = torch.tensor(dropped)
        offs_E = counts_E.cumsum(0).to(torch.int32)
        x_MD = self.backend.gather(x_TD.to(compute_dtype(x_TD)), order_M, k)
        if self.parallel is not None:  # experts may live on other ranks (expert parallel)
            y_MD = self.parallel.run_experts(self.experts, x_MD, counts_E, self.backend)
        else:
            y_MD = self.experts(x_MD, offs_E, self.backend)
        out_TD = self.backend.scatter(y_MD, order_M, routing.weights_Tk.to(y_MD.dtype))
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        seq_len = S if self.loss_cfg.aux_type == "sequence" else None
        if routing.order_M is not None:  # expert choice is balanced by construction
            balance = routing.logits_TE.new_zeros(())
        elif self.parallel is not None and seq_len is None:  # f over the whole global batch
            balance = self.parallel.balance_loss(routing.probs_TE, routing.expert_idx_Tk)
        else:
            balance = load_balance_loss(routing.probs_TE, routing.expert_idx_Tk, seq_len)
        stats = MoEStats(
            terms={"aux_loss": LossTerm(balance, self.loss_cfg.aux_coef),
                   "z_loss": LossTerm(z_loss(routing.logits_TE), self.loss_cfg.z_coef)},
            tokens_per_expert=tokens_per_expert.detach(),
            dropped_frac=dropped,
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


def drop_over_capacity(order_M: torch.Tensor, counts_E: torch.Tensor,
                       capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keeps the first `capacity` assignments of each expert (token order); the rest are dropped."""
    starts_E = counts_E.cumsum(0) - counts_E
    expert_of_M = torch.repeat_interleave(torch.arange(counts_E.numel(), device=counts_E.device),
                                          counts_E)
    rank_M = torch.arange(order_M.numel(), device=order_M.device) - starts_E[expert_of_M]
    keep_M = rank_M < capacity
    return order_M[keep_M], counts_E.clamp(max=capacity)
