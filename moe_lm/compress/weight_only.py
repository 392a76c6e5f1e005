"""Weight-only int8 / int4 quantization of a whole model through torchao's tensor subclasses.

Legend: E experts, D model width, F expert hidden size, M routed rows in expert order.

`quantize_model(model, mode)` quantizes, in place, every linear layer of attention, the dense
MLPs, shared experts and the routed experts (the embedding, the tied LM head, norms and routers
stay in full precision: they decide the routing and the vocabulary distribution):
- `int8`: torchao `Int8WeightOnlyConfig`, one scale per output channel.
- `int4`: torchao `IntxWeightOnlyConfig(weight_dtype=torch.int4)`, one scale and zero point per
  group of `INT4_GROUP` input channels. On x86 CPUs torchao has no packed int4 kernel, so the
  values are held one per int8 byte (`IntxUnpackedToInt8Tensor`): int4 accuracy, int8 memory.
- `int8-experts`: moe_lm's own int8 experts (`moe_lm.compress.quantize.Int8Experts`), kept to
  compare against.
torchao's subclasses implement `F.linear`, so the routed experts are first rewritten as E
`nn.Linear` triples (`LinearExperts`, the same function as `Experts`) that run the rows of each
non-empty expert group in turn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_lm.compress.quantize import quantize_experts_int8
from moe_lm.errors import ConfigError, MoeLMError
from moe_lm.inference.cli import QUANTIZE_MODES
from moe_lm.model.moe import Experts, MoE

INT4_GROUP = 32


class LinearExperts(nn.Module):
    """`Experts` as E (w1, w3, w2) `nn.Linear` triples, so torchao quantizes them like any linear.

    `forward(x_MD, offs_E, backend)` has the signature of `Experts.forward`; rows past the last
    group (alignment padding) get zeros."""

    def __init__(self, experts: Experts):
        super().__init__()
        E, D, Fh = experts.w1_EDF.shape

        def linears(w_EIO: torch.Tensor) -> nn.ModuleList:
            out = nn.ModuleList()
            for w_IO in w_EIO.detach():
                lin = nn.Linear(w_IO.shape[0], w_IO.shape[1], bias=False, device=w_IO.device)
                lin.weight.data.copy_(w_IO.t())
                out.append(lin)
            return out

        self.w1, self.w3, self.w2 = (linears(w) for w in
                                     (experts.w1_EDF, experts.w3_EDF, experts.w2_EFD))

    def forward(self, x_MD: torch.Tensor, offs_E: torch.Tensor, backend=None) -> torch.Tensor:
        out_MD = x_MD.new_zeros(x_MD.shape)
        start = 0
        for e, end in enumerate(offs_E.tolist()):  # host offsets: on CPU this costs nothing
            if end > start:
                x = x_MD[start:end]
                out_MD[start:end] = self.w2[e](F.silu(self.w1[e](x)) * self.w3[e](x))
            start = end
        return out_MD


def torchao_config(mode: str):
    """The torchao config of `mode` (int8 | int4); an install hint when torchao is missing."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup
    except ImportError as err:
        raise MoeLMError("--quantize int8|int4 needs torchao: pip install torchao "
                         "(or pip install -e '.[quant]').") from err
    if mode == "int8":
        return Int8WeightOnlyConfig()
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP))


def _quantizable(module: nn.Module, fqn: str) -> bool:
    """torchao's filter: linear layers, except routers (their top-k picks the experts)."""
    return isinstance(module, nn.Linear) and ".router." not in f".{fqn}."


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Quantizes `model`'s weights in place as `mode` (see QUANTIZE_MODES); returns it."""
    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"--quantize {mode}: choose one of {', '.join(QUANTIZE_MODES)}.")
    if mode == "none":
        return model
    if mode == "int8-experts":
        quantize_experts_int8(model)
        return model
    config = torchao_config(mode)
    from torchao.quantization import quantize_  # torchao_config checked that it imports

    for module in model.modules():
        if isinstance(module, MoE) and isinstance(module.experts, Experts):
            module.experts = LinearExperts(module.experts)
    quantize_(model, config, filter_fn=_quantizable)
    return model
