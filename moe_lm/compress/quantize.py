"""Int8 weight-only expert quantization.

Legend: E experts, K input width, N output width, M routed assignments.

Each expert matrix `w[e]` of shape (K, N) is stored as int8 with one fp32 scale per output channel
(per expert and column n): `scale[e, n] = max_k |w[e, k, n]| / 127`, `q = round(w / scale)`.
At run time the weights are dequantized to the compute dtype just before the grouped GEMM, so
activations stay in full precision ("weight-only"). Experts hold most of an MoE's parameters,
so this is where the memory goes; attention, embeddings and routers stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from moe_lm.errors import ConfigError
from moe_lm.inference.evaluate import evaluate_loaded
from moe_lm.inference.loading import LoadedModel
from moe_lm.model.moe import Experts, MoE

EXPERT_WEIGHTS = ("w1_EDF", "w3_EDF", "w2_EFD")


def quantize_int8_per_channel(w_EKN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per (expert, output channel): returns (q_EKN, scale_E1N)."""
    w = w_EKN.detach().float()
    scale_E1N = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    q_EKN = torch.round(w / scale_E1N).clamp_(-127, 127).to(torch.int8)
    return q_EKN, scale_E1N


class Int8Experts(nn.Module):
    """Drop-in for `Experts` holding int8 weights + per-channel scales (buffers, not parameters)."""

    def __init__(self, experts: Experts):
        super().__init__()
        for name in EXPERT_WEIGHTS:
            q, scale = quantize_int8_per_channel(getattr(experts, name))
            self.register_buffer(f"{name}_q", q)
            self.register_buffer(f"{name}_scale", scale)

    def weight(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized (E, K, N) weight in `dtype`."""
        return getattr(self, f"{name}_q").to(dtype) * getattr(self, f"{name}_scale").to(dtype)

    def forward(self, x_MD: torch.Tensor, offs_E: torch.Tensor, backend) -> torch.Tensor:
        dtype = x_MD.dtype
        gmm = backend.grouped_mm
        h_MF = (torch.nn.functional.silu(gmm(x_MD, self.weight("w1_EDF", dtype), offs_E))
                * gmm(x_MD, self.weight("w3_EDF", dtype), offs_E))
        return gmm(h_MF, self.weight("w2_EFD", dtype), offs_E)  # (M, D)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's quantized weights) counts its parts."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def model_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by parameters and buffers (a shared tensor once): all, and the routed experts'."""
    def held(m: nn.Module) -> int:
        return sum(tensor_bytes(t) for t in [*m.parameters(), *m.buffers()])

    experts = sum(held(m.experts) for m in model.modules() if isinstance(m, MoE))
    return {"total": held(model), "experts": experts}


@torch.no_grad()
def quantize_experts_int8(model: nn.Module) -> int:
    """Replaces every MoE layer's experts by Int8Experts, in place; returns how many layers."""
    n = 0
    for module in model.modules():
        if isinstance(module, MoE) and isinstance(module.experts, Experts):
            module.experts = Int8Experts(module.experts)
            n += 1
    if n == 0:
        raise ConfigError("The model has no MoE layers, so there are no experts to quantize.")
    return n


@dataclass
class QuantReport:
    """Memory and validation quality before and after int8 expert quantization."""

    bytes_before: int
    bytes_after: int
    expert_bytes_before: int
    expert_bytes_after: int
    loss_before: float
    loss_after: float
    ppl_before: float
    ppl_after: float
    bpb_before: float
    bpb_after: float


def quantization_report(loaded: LoadedModel, batches: int | None = None) -> QuantReport:
    """Evaluates `loaded` in full precision, quantizes its experts in place, evaluates again."""
    before_mem = model_bytes(loaded.model)
    before = evaluate_loaded(loaded, batches=batches, precision="fp32", desc="before int8")
    quantize_experts_int8(loaded.model)
    after_mem = model_bytes(loaded.model)
    after = evaluate_loaded(loaded, batches=batches, precision="fp32", desc="int8 experts")
    return QuantReport(before_mem["total"], after_mem["total"], before_mem["experts"],
                       after_mem["experts"], before.loss, after.loss, before.ppl, after.ppl,
                       before.bits_per_byte, after.bits_per_byte)


def format_report(report: QuantReport) -> str:
    """The human-readable table: memory before and after, and what it cost in quality."""
    mb = 1e6
    return "\n".join([
        f"experts      {report.expert_bytes_before / mb:.2f} MB -> "
        f"{report.expert_bytes_after / mb:.2f} MB (int8 + fp32 per-channel scales)",
        f"whole model  {report.bytes_before / mb:.2f} MB -> {report.bytes_after / mb:.2f} MB "
        f"({1 - report.bytes_after / report.bytes_before:.1%} saved)",
        f"val loss     {report.loss_before:.4f} -> {report.loss_after:.4f} "
        f"({report.loss_after - report.loss_before:+.4f}), computed in fp32 (eval uses the "
        "run's trainer.precision; --precision fp32 there matches)",
        f"perplexity   {report.ppl_before:.3f} -> {report.ppl_after:.3f} "
        f"({report.ppl_after / report.ppl_before - 1:+.3%})",
        f"bits/byte    {report.bpb_before:.4f} -> {report.bpb_after:.4f}",
    ])
