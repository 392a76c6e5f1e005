"""The planner's per-rank memory: linear in depth as used, and within 25% of a measured real run."""

import pytest

from moe_lm.config import ParallelConfig
from moe_lm.planning.measure import measure_training_peak, measure_training_peak_distributed
from moe_lm.planning.memory import measure_rank_memory, rank_memory, with_depth
from tests.planning.test_counting import make_cfg

TINY = {"model.n_layers": 2, "model.d_model": 64, "model.n_heads": 4, "model.n_kv_heads": 2,
        "model.ffn_hidden": 128, "expert.num_experts": 4, "expert.hidden_size": 64,
        "data.seq_len": 32, "data.batch_size": 4, "trainer.precision": "fp32"}


def test_depth_extension_equals_a_direct_measurement():
    cfg = make_cfg({**TINY, "model.n_layers": 9, "model.n_dense_layers": 1, "model.moe_every": 2,
                    "trainer.activation_checkpointing": "full", "trainer.grad_accum": 2})
    cfg.parallel = ParallelConfig(dp_shard=2, ep=2)
    direct = measure_rank_memory(cfg, "cuda")
    extended = rank_memory(cfg, "cuda")  # 4 repeats: measured at 1 and 2, extended
    assert extended.peak == pytest.approx(direct.peak, rel=1e-3)
    assert extended.parts["parameters"] == pytest.approx(direct.parts["parameters"], rel=1e-3)


def test_sharding_divides_the_parameter_state_by_the_world():
    cfg = make_cfg({**TINY, "model.n_layers": 3})
    one = measure_rank_memory(cfg, "cpu")
    cfg.parallel = ParallelConfig(dp_shard=2, ep=2)
    four = measure_rank_memory(cfg, "cpu")
    assert four.parts["parameters"] == pytest.approx(one.parts["parameters"] / 4, rel=0.02)
    assert four.all_to_all > 0 and one.all_to_all == 0


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_plan_memory_within_25_percent_of_a_measured_single_process_run(precision):
    cfg = make_cfg({"trainer.precision": precision}, vocab=100277)  # the tiny default
    planned = rank_memory(cfg, "cpu").peak
    measured = measure_training_peak(cfg)
    assert abs(planned - measured) <= 0.25 * measured, (planned, measured)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", [{"ep": 2}, {"dp_shard": 2}])
def test_plan_memory_within_25_percent_of_measured_two_process_fsdp_ep_runs(layout):
    cfg = make_cfg({**TINY, "model.n_layers": 3}, vocab=100277)
    cfg.parallel = ParallelConfig(**layout)
    planned = rank_memory(cfg, "cpu").peak
    measured = measure_training_peak_distributed(cfg)
    assert abs(planned - measured[0]) <= 0.25 * measured[0], (planned, measured)


def test_planner_counts_a_shared_block_once_and_its_activations_per_applied_layer():
    """share_layers=2 over 4 layers: the parameters and AdamW states of the 2-block
    model; the activations of the 4-layer one (FSDP + EP shards: sharded per distinct block)."""
    shared = make_cfg({**TINY, "model.n_layers": 4, "model.n_dense_layers": 0,
                       "model.share_layers": 2})
    blocks = make_cfg({**TINY, "model.n_layers": 2, "model.n_dense_layers": 0})
    applied = make_cfg({**TINY, "model.n_layers": 4, "model.n_dense_layers": 0})
    for cfg in (shared, blocks, applied):
        cfg.parallel = ParallelConfig(dp_shard=2, ep=2)
    s, b, a = (measure_rank_memory(c, "cpu") for c in (shared, blocks, applied))
    for part in ("parameters", "optimizer_states"):
        assert s.parts[part] == b.parts[part] < a.parts[part], part
    assert b.parts["activations"] < s.parts["activations"]
    assert rank_memory(with_depth(shared, 8), "cpu").parts["parameters"] == pytest.approx(
        measure_rank_memory(with_depth(shared, 8), "cpu").parts["parameters"], rel=1e-3)
