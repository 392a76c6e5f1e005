"""Knowledge distillation: the student matches a frozen teacher's temperature-softened logits.

Legend: N tokens, D model width (student Ds, teacher Dt), V vocabulary, C tokens per chunk.

loss = T^2 * mean_n KL(softmax(teacher_n / T) || softmax(student_n / T)), added to the LM loss
with weight `loss.distill_coef` (Hinton et al.: the T^2 keeps gradient sizes comparable across
temperatures). Neither model's (N, V) logits are ever held whole: the KL is computed C tokens at a
time from the final hidden states, and each chunk is recomputed in the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from moe_lm.errors import ConfigError


def _kl_chunk(hs_CD: torch.Tensor, ws_VD: torch.Tensor, ht_CD: torch.Tensor, wt_VD: torch.Tensor,
              temperature: float) -> torch.Tensor:
    logp_s_CV = F.log_softmax((hs_CD @ ws_VD.to(hs_CD.dtype).t()).float() / temperature, -1)
    logp_t_CV = F.log_softmax((ht_CD @ wt_VD.to(ht_CD.dtype).t()).float() / temperature, -1)
    return (logp_t_CV.exp() * (logp_t_CV - logp_s_CV)).sum()


def distill_kl(h_student_ND: torch.Tensor, w_student_VD: torch.Tensor, h_teacher_ND: torch.Tensor,
               w_teacher_VD: torch.Tensor, temperature: float, chunk: int = 1024) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) at `temperature` (not yet scaled by T^2)."""
    if w_student_VD.shape[0] != w_teacher_VD.shape[0]:
        raise ConfigError(f"The teacher's vocabulary ({w_teacher_VD.shape[0]}) differs from the "
                          f"student's ({w_student_VD.shape[0]}): distill from a teacher trained "
                          "with the same tokenizer and model.vocab_size.")
    h_teacher_ND = h_teacher_ND.detach()
    N = h_student_ND.shape[0]
    total = h_student_ND.new_zeros((), dtype=torch.float32)
    for start in range(0, N, chunk):
        total = total + checkpoint(_kl_chunk, h_student_ND[start:start + chunk], w_student_VD,
                                   h_teacher_ND[start:start + chunk], w_teacher_VD, temperature,
                                   use_reentrant=False)
    return total / N
