"""`trainer.precision`, resolved once: the forward's autocast dtype and FSDP2's mixed precision.

    precision = Precision.resolve(cfg.trainer.precision, device.type)
    with precision.autocast(device.type): ...           # the forward (training, eval, planning)
    fully_shard(module, mp_policy=precision.fsdp_policy())

bf16 means autocast to bf16 around the forward with fp32 master weights everywhere. On CUDA
FSDP2 also all-gathers bf16 parameters (gradients reduced in fp32); CPU runs keep fp32
all-gathers, exactly like a single process. Where the device has no bf16 support it falls back to
fp32, with one warning.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

from moe_lm.errors import ConfigError

PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class Precision:
    """What one run computes in: `autocast_dtype` None means plain fp32 (no autocast)."""

    name: str
    autocast_dtype: torch.dtype | None = None
    fsdp_param_dtype: torch.dtype | None = None
    fsdp_reduce_dtype: torch.dtype | None = None

    @classmethod
    def resolve(cls, precision: str, device_type: str, check_support: bool = True) -> Precision:
        """The precision `trainer.precision=precision` means on `device_type`. `check_support`
        False takes the target device's policy without looking at this machine (planning)."""
        if precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision={precision!r}: choose one of {PRECISIONS}.")
        if precision == "fp32":
            return cls("fp32")
        if check_support and not bf16_supported(device_type):
            warnings.warn("bf16 is not supported on this device; training in fp32.", stacklevel=2)
            return cls("fp32")
        if device_type == "cuda":
            return cls("bf16", torch.bfloat16, torch.bfloat16, torch.float32)
        return cls("bf16", torch.bfloat16)

    def autocast(self, device_type: str):
        """The context the forward runs in (a no-op for fp32 and on the meta device)."""
        if self.autocast_dtype is None or device_type == "meta":
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def fsdp_policy(self) -> MixedPrecisionPolicy:
        """FSDP2's mixed-precision policy for this precision."""
        return MixedPrecisionPolicy(param_dtype=self.fsdp_param_dtype,
                                    reduce_dtype=self.fsdp_reduce_dtype)


def bf16_supported(device_type: str) -> bool:
    """Whether `device_type` runs bf16 matmuls natively (CUDA with bf16, CPUs with AMX or
    AVX-512 bf16)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(cpu, c, lambda: False)() for c in checks)
