"""The persistent grouped GEMM's tile schedule and tile-shape choice (kernels/schedule.py).

The row-tile table is checked against a plain Python walk over the groups; the tile choice
against the rule it states (rows per expert, shared-memory budget), computed here, not copied.
"""

from __future__ import annotations

import pytest
import torch

from moe_lm import kernels
from moe_lm.kernels import schedule

needs_interpreter = pytest.mark.skipif(not kernels.INTERPRET, reason="CPU needs TRITON_INTERPRET=1")


def _expected_tiles(sizes: list[int], T: int, block_m: int) -> list[tuple[int, int, int]]:
    """(group, first row, end row) per block_m rows of each group, then of the tail [end, T)."""
    out, start = [], 0
    for g, n in enumerate(sizes + [None]):
        end = T if n is None else min(start + n, T)
        for r in range(start, end, block_m):
            out.append((g, r, end))
        start = end
    return out


# rows per group, rows past the last group, BLOCK_M: empty groups (leading, inner, trailing),
# ragged ends, a tail, groups that end exactly on a block, more tiles than one program block
CASES = [
    ([5, 0, 9, 1, 0, 0, 2, 3], 6, 16),
    ([0, 0, 1, 0], 0, 16),
    ([16, 32, 0, 17], 0, 16),
    ([3] * 40, 5, 2),
    ([0, 0, 0], 4, 16),
]


@needs_interpreter
@pytest.mark.parametrize("sizes,tail,block_m", CASES)
def test_row_tiles_lists_every_block_of_every_group_in_order(sizes, tail, block_m):
    T = sum(sizes) + tail
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    tiles, count = schedule.row_tiles(offs, T, block_m)
    want = _expected_tiles(sizes, T, block_m)
    assert tiles.shape[0] == schedule.max_row_tiles(T, len(sizes), block_m) >= len(want)
    assert int(count) == len(want)
    assert [tuple(r) for r in tiles[: len(want)].tolist()] == want
    assert (tiles[len(want):, 0] == -1).all()  # idle entries name no group


@needs_interpreter
def test_row_tiles_clamps_offsets_past_the_rows():
    offs = torch.tensor([4, 30], dtype=torch.int32)  # the second group claims rows beyond T
    tiles, count = schedule.row_tiles(offs, 10, 4)
    assert [tuple(r) for r in tiles[: int(count)].tolist()] == _expected_tiles([4, 6], 10, 4)


def test_expert_order_puts_the_most_loaded_experts_first_stably():
    sizes = [3, 0, 7, 3, 7, 1]
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    want = sorted(range(len(sizes)), key=lambda e: -sizes[e])  # Python's sort is stable
    assert schedule.expert_order(offs, sum(sizes)).tolist() == want


def _fits(cfg: schedule.TileConfig, in_bytes: int) -> bool:
    stage = (cfg.block_m * cfg.block_k + cfg.block_k * cfg.block_n) * in_bytes
    return cfg.num_stages * stage + cfg.block_m * cfg.block_n * in_bytes <= schedule.SMEM_BYTES


def test_large_groups_get_cutlass_tiles_with_stages_that_fit():
    cfg = schedule.choose_tiles(16384 * 2, 8, 1536, 2048, torch.bfloat16)  # Mixtral-like
    assert (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps) == (128, 256, 64, 8)
    assert _fits(cfg, 2) and not _fits(
        schedule.TileConfig(128, 256, 64, 8, cfg.num_stages + 1), 2)  # as many stages as fit
    assert 3 <= cfg.num_stages <= 4


@pytest.mark.parametrize("rows,experts", [(128 * 64, 64), (96 * 64, 64), (10, 8)])
def test_experts_with_at_most_128_rows_get_the_small_tile(rows, experts):
    cfg = schedule.choose_tiles(rows, experts, 1536, 2048, torch.bfloat16)
    assert cfg.block_m < 128 and cfg.num_warps == 4
    assert _fits(cfg, 2)
    big = schedule.choose_tiles(rows + experts, experts, 1536, 2048, torch.bfloat16)
    assert (big.block_m > cfg.block_m) == (rows / experts == 128)  # 129 rows: the large tile


def test_fp32_operands_halve_block_k_and_narrow_widths_shrink_blocks():
    bf16 = schedule.choose_tiles(1 << 15, 8, 1024, 1024, torch.bfloat16)
    fp32 = schedule.choose_tiles(1 << 15, 8, 1024, 1024, torch.float32)
    assert fp32.block_k * 2 == bf16.block_k and _fits(fp32, 4)
    narrow = schedule.choose_tiles(1 << 15, 8, 20, 40, torch.bfloat16)
    assert (narrow.block_n, narrow.block_k) == (64, 32)  # next powers of two of N and K
    assert schedule.choose_tiles(1 << 15, 8, 3, 5, torch.bfloat16).block_k == 16  # tl.dot minimum


def test_tma_ready_follows_the_descriptor_rules():
    x = torch.randn(10, 36)  # 144-byte rows
    assert schedule.tma_ready(x)
    assert not schedule.tma_ready(torch.randn(10, 45))  # 180-byte rows: not 16-byte aligned
    assert not schedule.tma_ready(x.t())  # no unit stride in the last dim
    assert not schedule.tma_ready(torch.randn(400)[1:361].view(10, 36))  # base off by 4 bytes
