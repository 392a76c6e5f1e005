"""One training micro-step, the same for the Trainer, the dry run and the memory planners.

    result = forward_backward(model, batch_BS1, precision, device_type, extra=objectives)

Forward (under the run's `Precision`) with the fused LM-head loss, the model's named loss terms
(`ModelOutput.terms`, e.g. the MoE layers' balance and z-losses) and any extra objectives' terms,
their weighted sum as the total, then its backward. The result carries the model output (for the
routing statistics) and `logs`: the total, the LM loss and every term's value by name, detached.
A new loss term is a new name in some producer's `Terms`; nothing here changes.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from moe_lm.model import ModelOutput
from moe_lm.model.terms import Terms, total_loss
from moe_lm.parallel.precision import Precision

# (model, batch_BS1, model output) -> extra named terms (distillation, multi-token prediction)
ExtraTerms = Callable[[nn.Module, torch.Tensor, ModelOutput], Terms]


@dataclass
class StepResult:
    """What one micro-step computed: its output, total loss (undivided) and logged values."""

    out: ModelOutput
    loss: torch.Tensor
    logs: dict[str, torch.Tensor]  # "loss", "lm_loss", then each term's value, all detached


def forward_backward(model: nn.Module, batch_BS1: torch.Tensor, precision: Precision | None,
                     device_type: str, extra: ExtraTerms | None = None, grad_divisor: int = 1,
                     backward: bool = True) -> StepResult:
    """Next-token loss of `batch_BS1` (B, S+1 tokens) plus every loss term; backward of
    total / `grad_divisor` (gradient accumulation) unless `backward` is False."""
    context = precision.autocast(device_type) if precision is not None else nullcontext()
    with context:
        out = model(batch_BS1[:, :-1], batch_BS1[:, 1:], return_logits=False)
        terms = out.terms
        extra_terms = extra(model, batch_BS1, out) if extra is not None else {}
    total = total_loss(out.lm_loss, terms, extra_terms)
    if backward:
        (total / grad_divisor).backward()
    logs = {"loss": total.detach(), "lm_loss": out.lm_loss.detach()}
    for name, term in {**terms, **extra_terms}.items():
        logs[name] = term.value.detach()
    return StepResult(out, total, logs)
