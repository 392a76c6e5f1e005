"""The planner on pp and tp layouts: per-stage memory against real 2-process runs, the schedule's
in-flight microbatches against the paper's count, and the layout search."""

import pytest

from moe_lm.config import ParallelConfig
from moe_lm.planning.measure import measure_training_peak_distributed
from moe_lm.planning.report import gpu_capacity_bytes
from moe_lm.planning.schedules import held_microbatches
from moe_lm.planning.memory import world_size_of
from moe_lm.planning.search import search_layouts
from moe_lm.planning.stage_memory import layout_memory
from tests.planning.test_counting import make_cfg
from tests.planning.test_memory import TINY

PIPE = {**TINY, "model.n_layers": 4, "model.tie_embeddings": False}


@pytest.mark.parametrize("pp", [2, 4])
def test_in_flight_microbatches_are_torchs_schedules(pp):
    m = 2 * pp
    one = held_microbatches("1F1B", pp, m)
    # 1F1B: rank r runs pp - r forwards before its first backward (Narayanan et al. 2021)
    assert [max(sum(h.values()) for _, h in one[r]) for r in range(pp)] == [
        pp - r for r in range(pp)]
    inter = held_microbatches("Interleaved1F1B", pp, m)
    # interleaved, v = 2 chunks per rank: rank 0 warms up 2 (pp - 1) + (v - 1) pp chunks, + 1
    assert max(sum(h.values()) for _, h in inter[0]) == 2 * (pp - 1) + pp + 1


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", [{"pp": 2, "pp_microbatches": 2}, {"tp": 2}])
def test_plan_memory_within_25_percent_of_measured_two_process_pp_and_tp_runs(layout):
    # pp: every pipeline rank's planned peak against that rank of a real run of
    # moe_lm.parallel.pipeline's stages and torch's schedule (the Trainer's stages and schedules);
    # tp: the Trainer's parallelize, rank 0
    cfg = make_cfg(PIPE, vocab=100277)
    cfg.parallel = ParallelConfig(**layout)
    planned = layout_memory(cfg, "cpu")
    measured = measure_training_peak_distributed(cfg)
    per_rank = planned.per_pp_rank or [planned.peak] * len(measured)
    for plan_r, real_r in zip(per_rank, measured):
        assert abs(plan_r - real_r) <= 0.25 * real_r, (per_rank, measured)


def test_layout_search_measures_what_it_prints_at_the_same_global_batch():
    cfg = make_cfg({**PIPE, "data.batch_size": 4}, vocab=1000)
    cfg.parallel = ParallelConfig(dp_shard=4)
    cfg.plan.gpu_memory_gb = 0.0085  # 8.7 MiB, 7.8 MiB of it usable (plan.memory_headroom)
    cfg.plan.search, cfg.plan.search_top = "fewest", 2
    base = layout_memory(cfg, "cpu")
    capacity = gpu_capacity_bytes(cfg)
    result = search_layouts(cfg, base, capacity, 1.0, "cpu")
    rows = result["rows"]
    assert rows and [r["gpus"] for r in rows] == sorted(r["gpus"] for r in rows)
    assert rows[0]["gpus"] < world_size_of(cfg)
    for r in rows:
        assert r["peak_bytes"] <= capacity
        dp = r["dp_replicate"] * r["dp_shard"] * r["ep"]
        seqs = r["microbatches"] * dp * 4  # microbatches of 4 sequences, as in the base
        assert seqs == 4 * 4  # the base: 4 sequences x 1 micro-step x 4 ranks
