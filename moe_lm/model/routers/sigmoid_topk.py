"""`expert.router=sigmoid`: a sigmoid per expert, top-k, the k scores normalised (DeepSeek-V3)."""

from __future__ import annotations

import torch

from moe_lm.model.routers.base import TopKRouter


class SigmoidTopK(TopKRouter):
    """Independent sigmoid scores; the balance loss sees them normalised over the experts."""

    def scores(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores_TE = torch.sigmoid(logits_TE)
        return scores_TE, scores_TE / scores_TE.sum(-1, keepdim=True)
