"""Initialisation that gives every layout the same weights: each rank fills only its own shard.

A model's `init_weights()` states the rules (which tensor gets which distribution); this module
decides where the random numbers come from. Inside `seeded_init(model, seed)`, every random fill
of a parameter (`normal_`, `uniform_`, `trunc_normal_`) is served from generators keyed by
(seed, parameter name, chunk): the full tensor is cut into fixed blocks of rows along dim 0, and
block c of parameter `name` always holds the same numbers. A rank that holds a shard (a DTensor
with Shard placements) generates only the blocks that overlap it, so no rank ever materialises
more than its shard plus one block, and one process and any mesh produce identical values.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.overrides import TorchFunctionMode

from moe_lm.errors import MoeLMError

CHUNK_ELEMS = 1 << 22  # rows per block: as many as fit in 4M elements (at least one row)

_SHAPE_FREE_FILLS = {  # random fills whose distribution does not depend on the tensor's shape
    torch.Tensor.normal_, torch.Tensor.uniform_, nn.init.normal_, nn.init.uniform_,
    nn.init.trunc_normal_,
}
_SHAPE_DEPENDENT_FILLS = {
    nn.init.kaiming_normal_, nn.init.kaiming_uniform_, nn.init.xavier_normal_,
    nn.init.xavier_uniform_, nn.init.orthogonal_, nn.init.sparse_, torch.Tensor.random_,
    torch.Tensor.bernoulli_, torch.Tensor.exponential_, torch.Tensor.cauchy_,
    torch.Tensor.geometric_, torch.Tensor.log_normal_,
}


def block_seed(seed: int, name: str, block: int) -> int:
    """The generator seed of block `block` of parameter `name`: stable across runs and machines."""
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def rows_per_block(shape: torch.Size) -> int:
    """Rows of dim 0 per block; depends only on the full shape, never on the layout."""
    row = 1
    for n in shape[1:]:
        row *= n
    return max(1, CHUNK_ELEMS // max(row, 1))


def local_box(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], torch.Size]:
    """(local tensor, its global offset per dim, the global shape) of a tensor or DTensor."""
    if not isinstance(t, DTensor):
        return t, (0,) * t.dim(), t.shape
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for p in t.placements:
        if p.is_shard() and type(p) is not Shard:  # e.g. _StridedShard: not a box
            raise MoeLMError(f"seeded init cannot place a shard with placement {p}; shard expert "
                             "weights on a dim other than the EP dim (see moe_lm.parallel.fsdp).")
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), tuple(offset), t.shape


@torch.no_grad()
def fill_from_blocks(t: torch.Tensor, name: str, seed: int, fill) -> None:
    """Fills this rank's part of `t` with `fill(block, generator)` applied to each full block
    (rows [c*R, (c+1)*R) of the full tensor) that overlaps it."""
    local, offset, shape = local_box(t)
    if local.numel() == 0:
        return
    R = rows_per_block(shape)
    lo, hi = offset[0], offset[0] + local.shape[0]
    inner = tuple(slice(o, o + n) for o, n in zip(offset[1:], local.shape[1:]))
    for c in range(lo // R, (hi - 1) // R + 1):
        start, end = c * R, min((c + 1) * R, shape[0])
        gen = torch.Generator(device="cpu").manual_seed(block_seed(seed, name, c))
        block = torch.empty((end - start, *shape[1:]), dtype=torch.float32)
        fill(block, gen)
        a, b = max(lo, start), min(hi, end)
        local[a - lo:b - lo].copy_(block[(slice(a - start, b - start), *inner)])


class _SeededFills(TorchFunctionMode):
    """Serves random fills of the model's parameters from per-block generators."""

    def __init__(self, model: nn.Module, seed: int):
        super().__init__()
        self.seed = seed
        self.names = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        name = self.names.get(id(target)) if isinstance(target, torch.Tensor) else None
        if name is None:
            return func(*args, **kwargs)
        if func in _SHAPE_DEPENDENT_FILLS:
            raise MoeLMError(f"init_weights uses {getattr(func, '__name__', func)} on {name}, whose "
                             "values depend on the full shape; seeded_init supports normal_, "
                             "uniform_ and trunc_normal_ (and any non-random fill).")
        if func not in _SHAPE_FREE_FILLS:
            return func(*args, **kwargs)
        rest = args[1:] if args else ()
        kw = {k: v for k, v in kwargs.items() if k not in ("tensor", "generator")}

        def fill(block, gen):
            func(block, *rest, generator=gen, **kw)

        fill_from_blocks(target, name, self.seed, fill)
        return target


@contextlib.contextmanager
def seeded_init(model: nn.Module, seed: int) -> Iterator[None]:
    """Within this context, random fills of `model`'s parameters are layout-independent."""
    with _SeededFills(model, seed):
        yield


def init_on_device(model: nn.Module, device: torch.device | str, seed: int) -> nn.Module:
    """Allocates a (meta-built, possibly sharded) model on `device` and runs its init_weights
    with seeded fills: each rank allocates and fills only its own shards."""
    model.to_empty(device=device)
    with seeded_init(model, seed):
        model.init_weights()
    return model
