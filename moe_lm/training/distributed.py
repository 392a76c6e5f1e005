"""Process-group helpers that also work in a plain single process (no torchrun)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def any_rank_true(flag: bool, device: torch.device) -> bool:
    """True if `flag` is set on any rank (e.g. SIGTERM received, non-finite loss)."""
    if not is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def launched_world_size() -> int:
    """The world size torchrun (or any env:// launcher) announced; 1 for a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device_type: str, timeout_s: float) -> bool:
    """Joins the process group torchrun describes (env://): nccl on CUDA, gloo on CPU.

    Returns True if it created the group (the caller then calls `shutdown`), False when there is
    nothing to join (one process) or a group already exists (e.g. tests that made their own).
    A collective that waits longer than `timeout_s` raises instead of hanging forever.
    """
    if is_initialized() or launched_world_size() <= 1:
        return False
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    """Leaves the process group (at the end of a run, also after an error)."""
    if is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(values: dict[str, torch.Tensor | float],
                    device: torch.device) -> dict[str, float]:
    """Each value averaged over all ranks in one all-reduce (what the logged losses are)."""
    keys = list(values)
    if not is_initialized():
        return {k: float(values[k]) for k in keys}
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= world_size()
    return dict(zip(keys, t.tolist()))


def is_timeout(err: BaseException) -> bool:
    """True for the errors torch raises when a collective timed out."""
    text = str(err).lower()
    return isinstance(err, (RuntimeError, dist.DistError)) and (
        "timed out" in text or "timeout" in text)

