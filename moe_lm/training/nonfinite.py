"""Non-finite losses and gradient norms: the update is skipped on device, the run stops at the
next check (a Trainer mixin: it reads `optimizer`, `step` and `device`)."""

from __future__ import annotations

import torch

from moe_lm.errors import MoeLMError
from moe_lm.training import distributed as dist_utils


class TrainingError(MoeLMError):
    """The run cannot go on (e.g. a non-finite loss)."""


class NonFiniteGuard:
    """Records the first step whose loss or global gradient norm is not finite."""

    optimizer: torch.optim.Optimizer
    step: int
    device: torch.device

    def reset_nonfinite(self) -> None:
        self._first_bad = torch.zeros((), dtype=torch.long, device=self.device)  # 0: all finite
        self._bad_values: torch.Tensor | None = None  # (loss, grad norm) of the first bad step

    def skip_update_if_nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Makes the coming optimizer step a no-op if the (global) gradient norm is not finite.

        The fused AdamW skips its update on device when `found_inf` is set (the mechanism
        GradScaler uses), so the check needs no host-device sync; `check_finite` raises at the
        next logging step. Other optimizers are checked here, at once."""
        bad = ~torch.isfinite(grad_norm.detach()) | ~torch.isfinite(loss.detach())
        if not self.optimizer.defaults.get("fused"):
            self._first_bad = torch.where(bad, self.step + 1, 0)
            self._bad_values = torch.stack([loss.detach().float(), grad_norm.detach().float()])
            self.check_finite()
            return
        # the norm is global, so every rank skips the same steps; a rank's own loss only adds
        # to the error's text
        self.optimizer.found_inf = (~torch.isfinite(grad_norm.detach())).float()
        first_bad = torch.where(bad & (self._first_bad == 0), self.step + 1, self._first_bad)
        if self._bad_values is None:
            self._bad_values = torch.zeros(2, device=grad_norm.device)
        values = torch.stack([loss.detach().float(), grad_norm.detach().float()])
        self._bad_values = torch.where(first_bad != self._first_bad, values, self._bad_values)
        self._first_bad = first_bad

    def check_finite(self) -> None:
        """Raises if a step since the start had a non-finite loss or gradient norm (syncs)."""
        first = int(self._first_bad)
        if not dist_utils.any_rank_true(first > 0, self.device):
            return
        loss, norm = (self._bad_values.tolist() if first else (float("nan"), float("nan")))
        step = first or "(on another rank)"
        raise TrainingError(
            f"Non-finite loss or gradient norm at step {step} (loss {loss}, grad norm {norm}); "
            "the optimizer step was not taken. Lower optim.lr, raise optim.warmup_steps or use "
            "trainer.precision=fp32, then resume from the last checkpoint.")
