"""Routers: which experts each token goes to, with what weight; one class per `expert.router`.

    router = build_router(d_model, cfg.expert, cfg.loss)
    routing = router(x_TD)                                   # a moe_lm.model.routing.Routing
    terms = router.loss_terms(routing, dispatcher, seq_len)  # {"aux_loss": ..., "z_loss": ...}

A new router is one file here (a `Router` or `TopKRouter` subclass) and one line in `ROUTERS`.
"""

from __future__ import annotations

from moe_lm.config import ExpertConfig, LossConfig
from moe_lm.errors import ConfigError
from moe_lm.model.routers.base import Router, TopKRouter, softmax_over_experts
from moe_lm.model.routers.expert_choice import ExpertChoice, expert_choice_capacity
from moe_lm.model.routers.group_limited import GroupLimitedTopK
from moe_lm.model.routers.sigmoid_topk import SigmoidTopK
from moe_lm.model.routers.softmax_topk import SoftmaxTopK

ROUTERS: dict[str, type[Router]] = {
    "softmax": SoftmaxTopK,
    "sigmoid": SigmoidTopK,
    "expert_choice": ExpertChoice,
    "group_limited": GroupLimitedTopK,
}


def build_router(d_model: int, cfg: ExpertConfig, loss_cfg: LossConfig) -> Router:
    """The router of `expert.router`; ConfigError naming the choices for any other name."""
    if cfg.router not in ROUTERS:
        *rest, last = ROUTERS
        raise ConfigError(f"expert.router={cfg.router!r}: choose {', '.join(rest)} or {last}.")
    return ROUTERS[cfg.router](d_model, cfg, loss_cfg)


__all__ = ["ROUTERS", "ExpertChoice", "GroupLimitedTopK", "Router", "SigmoidTopK", "SoftmaxTopK", "TopKRouter",
           "build_router", "expert_choice_capacity", "softmax_over_experts"]
