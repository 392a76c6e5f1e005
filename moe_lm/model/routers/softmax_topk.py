"""`expert.router=softmax`: softmax over the experts, top-k, the k weights renormalised to 1
(`expert.norm_topk_prob=false`: the k softmax scores as they are, as OLMoE and Qwen3-MoE do)."""

from __future__ import annotations

import torch

from moe_lm.config import ExpertConfig, LossConfig
from moe_lm.model.routers.base import TopKRouter, softmax_over_experts


class SoftmaxTopK(TopKRouter):
    """Softmax scores; the balance loss sees the same softmax."""

    def __init__(self, d_model: int, cfg: ExpertConfig, loss_cfg: LossConfig):
        super().__init__(d_model, cfg, loss_cfg)
        self.norm_topk_prob = cfg.norm_topk_prob

    def combine_weights(self, top_Tk: torch.Tensor) -> torch.Tensor:
        return super().combine_weights(top_Tk) if self.norm_topk_prob else top_Tk

    def scores(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs_TE = softmax_over_experts(logits_TE)
        return probs_TE, probs_TE
