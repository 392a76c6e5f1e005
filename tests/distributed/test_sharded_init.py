"""Per-rank initialisation equals the single-process one, and each rank allocates only its shard."""

from __future__ import annotations

import pytest
import torch

from moe_lm.model import Transformer
from moe_lm.parallel import init_on_device
from moe_lm.parallel.seeded_init import CHUNK_ELEMS, rows_per_block
from tests.distributed.helpers import spawn_ranks
from tests.distributed.workers import init_rank, tiny_config
from moe_lm.config import ParallelConfig

pytestmark = pytest.mark.distributed


def test_per_rank_init_equals_single_process_init(tmp_path):
    layouts = [(1, 2, 1), (1, 1, 2), (2, 1, 1), (1, 1, 1, 2)]  # FSDP, EP, replicated, TP
    ranks = spawn_ranks(init_rank, (layouts,), tmp_path)
    for r, result in enumerate(ranks):
        assert result["ok"], result.get("traceback")
        for layout, stats in result["value"].items():
            assert stats["max_diff"] == 0.0, (r, layout, stats)  # bit-identical
            # HSDP replicates; tp replicates the router and routed experts
            expected_share = 1.0 if layout in ("2x1x1", "1x1x1x2") else 0.5
            assert stats["max_share"] <= expected_share + 1e-9, (r, layout, stats)


def test_seeded_init_is_deterministic_and_not_the_global_rng():
    cfg = tiny_config(ParallelConfig())
    parts = (cfg.model, cfg.expert, cfg.loss)
    a = init_on_device(Transformer(*parts), "cpu", seed=7).state_dict()
    torch.manual_seed(123)  # the global RNG plays no part
    b = init_on_device(Transformer(*parts), "cpu", seed=7).state_dict()
    c = init_on_device(Transformer(*parts), "cpu", seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed.weight"], c["embed.weight"])
    std = cfg.model.init_std
    assert abs(a["embed.weight"].std().item() - std) < 0.1 * std  # the model's own rule
    assert torch.all(a["norm.weight"] == 1.0)


def test_blocks_depend_only_on_the_full_shape():
    assert rows_per_block(torch.Size([10, 4])) == CHUNK_ELEMS // 4
    assert rows_per_block(torch.Size([8, 4096, 4096])) == 1  # one expert matrix per block
