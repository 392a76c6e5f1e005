"""Keeps freed CPU memory in the process (glibc malloc) instead of returning it to the OS.

glibc serves allocations above its mmap threshold (128 KB, raised up to 32 MB as they are freed)
with fresh `mmap`s and gives them back on free, so every large tensor a CPU step allocates is
page-faulted in again: on the 2-core Xeon of the benchmarks a bf16 multiply of two 8192 x 1024
tensors took 16.6 ms allocating its output and 5.2 ms into an existing buffer. Raising the mmap
and trim thresholds to 1 GB makes such tensors reuse the heap (the step's working set stays
resident; tensors over 1 GB still come and go through mmap). Process-wide, so a benchmark that
calls it speeds up every candidate alike. `MOE_LM_KEEP_CPU_MEMORY=0` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
KEEP_BYTES = 1 << 30
_applied: bool | None = None


def keep_freed_cpu_memory() -> bool:
    """Applies the thresholds once per process; True if glibc accepted them."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("MOE_LM_KEEP_CPU_MEMORY", "1") == "0" or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES)) and bool(
        mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES))
    return _applied


def freed_cpu_memory_kept() -> bool:
    """Whether `keep_freed_cpu_memory` has taken effect in this process (applies nothing)."""
    return bool(_applied)
