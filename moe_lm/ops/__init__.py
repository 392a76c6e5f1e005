"""The ops layer: the one seam (`get_backend`) through which the MoE layer runs dispatch and experts.

A backend provides the kernel API of design section 3: `route`, `gather`, `scatter`, `grouped_mm`.
"""

from __future__ import annotations

from types import ModuleType

from moe_lm.errors import ConfigError


def get_backend(name: str) -> ModuleType:
    """Returns the module implementing the kernel API for `expert.backend=name`."""
    if name == "torch":
        from moe_lm.ops import torch_ref

        torch_ref.probe_native_support()
        return torch_ref
    if name == "triton":
        from moe_lm.ops import triton_ops

        return triton_ops
    if name == "megablocks":
        from moe_lm.ops import megablocks_ops

        return megablocks_ops
    raise ConfigError(f"expert.backend={name!r}: choose torch, triton or megablocks.")
