"""`expert.router=softmax`: softmax over the experts, top-k, the k weights renormalised to 1."""

from __future__ import annotations

import torch

from moe_lm.model.routers.base import TopKRouter, softmax_over_experts


class SoftmaxTopK(TopKRouter):
    """Softmax scores; the balance loss sees the same softmax."""

    def scores(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs_TE = softmax_over_experts(logits_TE)
        return probs_TE, probs_TE
