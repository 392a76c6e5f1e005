"""Named loss terms: how routers, MoE layers and extra objectives hand their losses to the loop.

Each producer returns `{name: LossTerm}`; the training step adds `coef * value` of every term to
the LM loss and logs `value` under the term's name. A new loss is a new name in some producer's
dict: the loop, the metrics and the dashboard need no edit (they show whatever names arrive).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossTerm:
    """One part of the training loss: `value` is what is logged, `coef * value` what is added."""

    value: torch.Tensor  # scalar, differentiable (or a constant zero)
    coef: float = 1.0

    @property
    def weighted(self) -> torch.Tensor:
        return self.value * self.coef


Terms = dict[str, LossTerm]


def mean_terms(per_layer: list[Terms]) -> Terms:
    """The layers' terms averaged by name (each name's coefficient is the same in every layer)."""
    names: dict[str, list[LossTerm]] = {}
    for terms in per_layer:
        for name, term in terms.items():
            names.setdefault(name, []).append(term)
    return {name: LossTerm(torch.stack([t.value for t in ts]).mean(), ts[0].coef)
            for name, ts in names.items()}


def total_loss(lm_loss: torch.Tensor, *term_dicts: Terms) -> torch.Tensor:
    """LM loss plus the weighted sum of every term, in the order given."""
    total = lm_loss
    for terms in term_dicts:
        for term in terms.values():
            total = total + term.weighted
    return total
