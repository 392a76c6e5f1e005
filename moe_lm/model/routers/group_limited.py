"""`expert.router=group_limited`: DeepSeek-V3's node-limited routing (torchtitan: expert groups).

Legend: T tokens, E experts, G = expert.num_groups groups of E/G consecutive experts,
g = expert.topk_groups groups kept per token, k experts per token.

Each token first keeps its g best groups, a group's score being the sum of its two best
(biased) expert scores, then picks its top-k experts inside them. With a group per node (or per
EP rank) a token's experts live on at most g of them, which bounds its all-to-all traffic.
Scores, weights and the balance loss are the sigmoid router's.
"""

from __future__ import annotations

import torch

from moe_lm.config import ExpertConfig, LossConfig
from moe_lm.model.routers.sigmoid_topk import SigmoidTopK


class GroupLimitedTopK(SigmoidTopK):
    """Sigmoid top-k restricted to each token's `topk_groups` best groups of experts."""

    def __init__(self, d_model: int, cfg: ExpertConfig, loss_cfg: LossConfig):
        super().__init__(d_model, cfg, loss_cfg)
        self.num_groups, self.topk_groups = cfg.num_groups, cfg.topk_groups

    def select(self, biased_TE: torch.Tensor) -> torch.Tensor:
        T, E = biased_TE.shape
        per_group = E // self.num_groups
        group_TG = biased_TE.reshape(T, self.num_groups, per_group).topk(2, dim=-1).values.sum(-1)
        kept_Tg = group_TG.topk(self.topk_groups, dim=-1).indices
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, kept_Tg, True)
        keep_TE = keep_TG.repeat_interleave(per_group, dim=1)
        return biased_TE.masked_fill(~keep_TE, float("-inf")).topk(self.top_k, dim=-1).indices
