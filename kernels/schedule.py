"""Tile schedules and tile shapes for the persistent grouped GEMM kernels.

Legend: T rows (expert-sorted), K reduction width, N output width, E experts; offs_E the
cumulative end row of each expert (int32), as for `grouped_mm`.

The grouped GEMM kernels are persistent: `NUM_SMS` programs walk one flat table of tiles with
`tl.range(pid, num_tiles, NUM_SMS)`, so one tile's epilogue overlaps the next tile's loads and no
program is launched for an empty expert. Two tables:
- row tiles (forward and dX): one (expert, first row, end row) per BLOCK_M rows of each expert,
  laid end to end, plus the virtual tail group E = rows [offs[E-1], T) that gets zeros. Written on
  the device by `row_tiles` (one small kernel), so the host never reads `offs`.
- output tiles (dW): (expert, output tile) for every expert, the most loaded experts first, so the
  longest reductions start first and the short ones fill the end (`expert_order`; the output
  tile is the flat index modulo the tiles per expert).
`choose_tiles` picks the tile shape from what the host knows without a sync (shapes only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SMEM_BYTES = 227 * 1024  # shared memory per block on sm90 (H100/H200)
SMALL_GROUP_ROWS = 128  # experts with at most this many rows (on average) get the small tile


@dataclass(frozen=True)
class TileConfig:
    """One tile shape of the grouped GEMM: blocks, warps and pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def pipeline_stages(block_m: int, block_n: int, block_k: int, in_bytes: int, out_bytes: int,
                    smem_bytes: int = SMEM_BYTES, max_stages: int = 4) -> int:
    """Stages of (A, B) operand tiles that fit the shared memory left by the epilogue tile."""
    per_stage = (block_m * block_k + block_k * block_n) * in_bytes
    epilogue = block_m * block_n * out_bytes
    return max(1, min(max_stages, (smem_bytes - epilogue) // per_stage))


def choose_tiles(rows: int, experts: int, K: int, N: int, dtype: torch.dtype) -> TileConfig:
    """Tile shape for `rows` expert-sorted rows over `experts` groups, reducing over K into N.

    CUTLASS's sm90 tile (128x256x64, 8 warps) when experts average more than SMALL_GROUP_ROWS
    rows; 64x128x64 with 4 warps otherwise, where a 128-row tile would be mostly padding. 4-byte
    operands halve BLOCK_K so the stages still fit. Blocks shrink to the next power of two of a
    narrow N or K (never below 16, the smallest `tl.dot`).
    """
    in_bytes = torch.empty((), dtype=dtype).element_size()
    mean_rows = rows / max(experts, 1)
    if mean_rows > SMALL_GROUP_ROWS:
        block_m, block_n, block_k, warps = 128, 256, 64, 8
    else:
        block_m, block_n, block_k, warps = 64, 128, 64, 4
    if in_bytes >= 4:
        block_k //= 2
    block_n = min(block_n, max(16, triton.next_power_of_2(max(N, 1))))
    block_k = min(block_k, max(16, triton.next_power_of_2(max(K, 1))))
    stages = pipeline_stages(block_m, block_n, block_k, in_bytes, in_bytes)
    return TileConfig(block_m, block_n, block_k, warps, stages)


def max_row_tiles(T: int, E: int, block_m: int) -> int:
    """Upper bound on the row tiles of E groups plus the tail over T rows: each group adds at
    most one partial tile."""
    return triton.cdiv(T, block_m) + E + 1


@triton.jit
def _row_tiles_kernel(offs_ptr, tiles_ptr, count_ptr, T, E, MAX_TILES,
                      BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    """tiles[i] = (group, first row, end row) of flat row tile i; count = number of real tiles.
    Entries past the count get group -1."""
    pid = tl.program_id(0)
    g = tl.arange(0, BLOCK_E)
    ends = tl.load(offs_ptr + g, mask=g < E, other=0)
    ends = tl.minimum(tl.where(g < E, ends, T), T)  # offsets past T would read out of bounds
    prev = tl.load(offs_ptr + g - 1, mask=(g >= 1) & (g <= E), other=0)
    starts = tl.minimum(tl.where(g == 0, 0, tl.where(g <= E, prev, T)), T)
    tiles = (tl.maximum(ends - starts, 0) + BLOCK_M - 1) // BLOCK_M  # 0 for an empty group
    cum = tl.cumsum(tiles, 0)  # inclusive tile count per group
    total = tl.sum(tiles, 0)

    i = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    group = tl.sum((cum[None, :] <= i[:, None]).to(tl.int32), 1)  # (BLOCK_T,)
    here = g[None, :] == group[:, None]
    first_tile = tl.sum(tl.where(g[None, :] < group[:, None], tiles[None, :], 0), 1)
    row_start = tl.sum(tl.where(here, starts[None, :], 0), 1) + (i - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(here, ends[None, :], 0), 1)
    real = i < total
    ok = i < MAX_TILES
    tl.store(tiles_ptr + i * 3, tl.where(real, group, -1), mask=ok)
    tl.store(tiles_ptr + i * 3 + 1, tl.where(real, row_start, 0), mask=ok)
    tl.store(tiles_ptr + i * 3 + 2, tl.where(real, row_end, 0), mask=ok)
    tl.store(count_ptr, total, mask=pid == 0)


def row_tiles(offs_E: torch.Tensor, T: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tiles (max_row_tiles, 3) int32 of (group, first row, end row), count (1,) int32).

    Groups 0..E-1 are the experts, group E the tail [offs[E-1], T) whose rows get zeros; empty
    groups own no tiles. All on the device: the host never reads `offs`.
    """
    E = offs_E.shape[0]
    max_tiles = max_row_tiles(T, E, block_m)
    tiles = torch.empty(max_tiles, 3, dtype=torch.int32, device=offs_E.device)
    count = torch.empty(1, dtype=torch.int32, device=offs_E.device)
    block_t = 64
    _row_tiles_kernel[(triton.cdiv(max_tiles, block_t),)](
        offs_E, tiles, count, T, E, max_tiles, BLOCK_M=block_m,
        BLOCK_E=triton.next_power_of_2(E + 1), BLOCK_T=block_t)
    return tiles, count


def expert_order(offs_E: torch.Tensor, T: int) -> torch.Tensor:
    """(E,) int32: the experts, most rows first (stable on the device: ties keep expert order).

    The dW table: flat output tile t is (expert_order[t // tiles_per_expert], t % tiles_per_expert)
    with tiles_per_expert = cdiv(K, BLOCK_K) * cdiv(N, BLOCK_N) computed in the kernel, so the
    autotuner may change BLOCK_K and BLOCK_N without a new table. Empty experts stay in it:
    their tiles write zeros."""
    ends = offs_E.to(torch.int64).clamp(max=T)
    sizes = torch.diff(ends, prepend=ends.new_zeros(1)).clamp(min=0)
    return torch.sort(sizes, descending=True, stable=True).indices.to(torch.int32)


def tma_ready(t: torch.Tensor) -> bool:
    """Whether a tensor descriptor can cover `t` (TMA's rules): unit stride in the last dim,
    16-byte aligned base and other strides. Else the kernels load through masked pointers."""
    if not _descriptors_available(t.device):
        return False
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all((st * size) % 16 == 0 for st in t.stride()[:-1]))


_ALLOCATOR_SET = False


def _descriptors_available(device: torch.device) -> bool:
    """Device-built descriptors need a global scratch allocator on the GPU (set once here) and
    sm90 or newer; the interpreter emulates them anywhere."""
    global _ALLOCATOR_SET
    if device.type != "cuda":
        return True  # CPU tensors only run under the interpreter
    if torch.cuda.get_device_capability(device)[0] < 9:
        return False
    if not _ALLOCATOR_SET:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8,
                                                                     device=device))
        _ALLOCATOR_SET = True
    return True


def num_programs(device: torch.device, interpret: bool) -> int:
    """Persistent programs: one per SM on a GPU; a few under the interpreter, so that each
    program walks several tiles (the loop is what the tests exercise)."""
    if interpret or device.type != "cuda":
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count
