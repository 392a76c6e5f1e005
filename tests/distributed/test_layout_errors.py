"""Bad layouts fail with a clear error before any model is allocated; planning works on meta."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_lm.config import ExpertConfig, ParallelConfig
from moe_lm.errors import ConfigError
from moe_lm.model import Transformer
from moe_lm.parallel import build_mesh, parallelize, validate_layout
from moe_lm.training import loop
from tests.distributed.workers import tiny_config
from tests.training.helpers import train_in_process

pytestmark = pytest.mark.distributed


@pytest.fixture
def no_model_allocation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the layout was checked")

    monkeypatch.setattr(loop, "Transformer", refuse)


def test_world_size_not_the_mesh_product_fails_before_the_model(tmp_path, tiny_overrides,
                                                                no_model_allocation):
    with pytest.raises(ConfigError, match=r"parallel.dp_replicate=1 x parallel.dp_shard=2 x "
                                          r"parallel.ep=2 = 4 ranks, but this run has 1"):
        train_in_process(tmp_path, [*tiny_overrides, "parallel.dp_shard=2", "parallel.ep=2"])


def test_experts_not_divisible_by_ep_fail_at_compose(tmp_path, tiny_overrides,
                                                     no_model_allocation):
    with pytest.raises(ConfigError, match="expert.num_experts=4 is not divisible by parallel.ep=3"):
        train_in_process(tmp_path, [*tiny_overrides, "parallel.ep=3"])


def test_cuda_only_backend_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="megablocks needs CUDA"):
        validate_layout(ParallelConfig(), ExpertConfig(backend="megablocks"), 1, "cpu")
    with pytest.raises(ConfigError, match="not divisible by parallel.ep=3"):
        validate_layout(ParallelConfig(ep=3), ExpertConfig(num_experts=8), 3, "cpu")


def test_layout_of_a_large_world_on_meta_with_a_fake_process_group():
    """What the planner does: 64 ranks simulated in one process, nothing allocated."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=5, world_size=64)
    try:
        cfg = tiny_config(ParallelConfig(dp_replicate=2, dp_shard=8, ep=4))
        mesh = build_mesh(cfg.parallel, "cpu", cfg.expert)
        with torch.device("meta"):
            model = Transformer(cfg.model, cfg.expert, cfg.loss)
        parallelize(model, mesh, cfg)
        params = dict(model.named_parameters())
        w1 = params["layers.1.mlp.experts.w1_EDF"]  # (E=4, D=32, F=24)
        assert w1.is_meta and tuple(w1.to_local().shape) == (1, 4, 24)  # 4/ep experts, D/8
        emb = params["embed.weight"]  # (300, 32) over dp_shard x ep = 32 ranks
        assert tuple(emb.to_local().shape) == (10, 32)
        assert build_mesh(ParallelConfig(dp_replicate=2, dp_shard=8, ep=4), "cpu").size() == 64
        with pytest.raises(ConfigError, match="this run has 64"):
            build_mesh(ParallelConfig(dp_shard=8), "cpu", cfg.expert)
    finally:
        dist.destroy_process_group()
