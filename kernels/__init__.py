"""moe_lm.kernels: Triton kernels and their launchers (tensors in, tensors out).

Installed as `moe_lm.kernels` but never imports the rest of moe_lm. The kernel API (design
section 3) is `grouped_mm`, `route`, `gather`, `scatter`; the backward launchers sit beside it.
On CPU the kernels need `TRITON_INTERPRET=1` set before this package is imported.
"""

from .config import INTERPRET, check_device
from .dispatch import (combine, gather, gather_backward, inverse_order, route, scatter,
                       scatter_backward)
from .grouped_gemm import grouped_mm, grouped_mm_dw, grouped_mm_dx

__all__ = [
    "INTERPRET", "check_device", "combine", "gather", "gather_backward", "grouped_mm",
    "grouped_mm_dw", "grouped_mm_dx", "inverse_order", "route", "scatter", "scatter_backward",
]
