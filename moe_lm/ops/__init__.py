"""The ops layer: the one seam (`get_backend`) through which the MoE layer runs dispatch and experts.

Every backend implements `moe_lm.ops.backend.ExpertBackend` in full; `BACKENDS` is the registry of
`expert.backend` values. `moe_lm.ops.reference` is the plain version the tests check them against.
"""

from __future__ import annotations

from typing import Callable

from moe_lm.errors import ConfigError
from moe_lm.ops.backend import ExpertBackend
from moe_lm.ops.megablocks_ops import MegaBlocksBackend
from moe_lm.ops.torch_backend import TorchBackend
from moe_lm.ops.triton_ops import TritonBackend

BACKENDS: dict[str, Callable[[], ExpertBackend]] = {
    "torch": TorchBackend,
    "triton": TritonBackend,
    "megablocks": MegaBlocksBackend,  # megablocks itself is imported when the backend is built
}


def get_backend(name: str) -> ExpertBackend:
    """The backend for `expert.backend=name`; ConfigError naming the choices for any other name."""
    if name not in BACKENDS:
        *rest, last = BACKENDS
        raise ConfigError(f"expert.backend={name!r}: choose {', '.join(rest)} or {last}.")
    return BACKENDS[name]()


__all__ = ["BACKENDS", "ExpertBackend", "get_backend"]
