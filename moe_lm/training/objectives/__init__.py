"""Extra training objectives added to the LM loss: knowledge distillation and multi-token
prediction. `ExtraObjectives` is what the training loop calls; both are off by default
(`loss.distill_coef = 0`, `loss.mtp_coef = 0`) and cost nothing then.
"""

from __future__ import annotations

import torch

from moe_lm.config import TrainConfig
from moe_lm.errors import ConfigError
from moe_lm.model import ModelOutput, Transformer
from moe_lm.model.terms import LossTerm, Terms
from moe_lm.training.objectives.distill import distill_kl
from moe_lm.training.objectives.mtp import MTPHeads
from moe_lm.training import distributed as dist_utils
from moe_lm.training.trained_model import load_trained_model

__all__ = ["ExtraObjectives", "MTPHeads", "distill_kl", "objective_term_names"]

DISTILL_TERM, MTP_TERM = "distill_kl", "mtp_loss"  # the names their values are logged under


def objective_term_names(loss_cfg) -> list[str]:
    """The loss terms the configured extra objectives add (what `ExtraObjectives` returns)."""
    return ([DISTILL_TERM] if loss_cfg.distill_coef > 0 else []) + \
        ([MTP_TERM] if loss_cfg.mtp_coef > 0 else [])


class ExtraObjectives:
    """Builds what the configured objectives need (a frozen teacher, MTP modules on the model)
    and computes their losses for a batch.

    Must be constructed before the optimizer: MTP modules are attached to `model` as `model.mtp`.
    """

    def __init__(self, cfg: TrainConfig, model: Transformer, device: torch.device,
                 tokenizer_name: str):
        self.loss_cfg = cfg.loss
        self.teacher: Transformer | None = None
        self.mtp: MTPHeads | None = None
        if cfg.loss.distill_coef > 0:
            teacher = load_trained_model(cfg.loss.distill_teacher, device=device.type,
                                         backend=cfg.expert.backend)
            # the checkpoint's canonical name (cl100k_base, or hf-<hash> of a tokenizer.json: the
            # config's data.tokenizer is then a path, which two runs may spell differently)
            teacher_tokenizer = teacher.ckpt.meta["identity"]["tokenizer"]
            if teacher_tokenizer != tokenizer_name:
                raise ConfigError(f"The teacher {cfg.loss.distill_teacher} uses tokenizer "
                                  f"{teacher_tokenizer}, the student {tokenizer_name}: "
                                  "distillation needs the same tokenizer (data.tokenizer).")
            if teacher.cfg.model.vocab_size != cfg.model.vocab_size:
                raise ConfigError(f"The teacher's model.vocab_size ({teacher.cfg.model.vocab_size})"
                                  f" differs from the student's ({cfg.model.vocab_size}); set the "
                                  "student's model.vocab_size to match.")
            self.teacher = teacher.model.requires_grad_(False).eval()
        if cfg.loss.mtp_coef > 0:
            if dist_utils.world_size() > 1:
                raise ConfigError("loss.mtp_coef > 0 runs in a single process for now (the MTP "
                                  "modules are not sharded or all-reduced): train it without "
                                  "torchrun, or set loss.mtp_coef=0.")
            self.mtp = MTPHeads(cfg.model, cfg.expert, cfg.loss, cfg.loss.mtp_depth).to(device)
            model.mtp = self.mtp

    @property
    def active(self) -> bool:
        return self.teacher is not None or self.mtp is not None

    def __call__(self, model: Transformer, batch_BS1: torch.Tensor, out: ModelOutput) -> Terms:
        """The configured objectives' named loss terms for this batch (none when off)."""
        terms: Terms = {}
        if self.teacher is not None:
            T = self.loss_cfg.distill_temperature
            with torch.no_grad():
                teacher_out = self.teacher(batch_BS1[:, :-1], batch_BS1[:, 1:], return_logits=False)
            kl = distill_kl(out.hidden.flatten(0, 1), model.head_weight_VD,
                            teacher_out.hidden.flatten(0, 1), self.teacher.head_weight_VD, T)
            terms[DISTILL_TERM] = LossTerm(kl, self.loss_cfg.distill_coef * T * T)
        if self.mtp is not None:
            mtp_loss = self.mtp.loss(model, batch_BS1, out.hidden)
            terms[MTP_TERM] = LossTerm(mtp_loss, self.loss_cfg.mtp_coef)
        return terms
