"""Pipeline parallelism with torch's schedules equals one process; impossible pipelines are refused.

Two ranks run the stages of a 4-block model (blocks 1-3 MoE, untied LM head) through
`torch.distributed.pipelining`; the reference is one process running the same microbatches as
gradient accumulation. Per step the loss, the balance loss, the gradient norm over all stages
(clipped) and every parameter's gradient by name must agree: the MoE loss terms ride along the
stage outputs, so the routers of every stage get their gradients.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from moe_lm.config import ParallelConfig
from moe_lm.errors import ConfigError
from moe_lm.parallel import pipeline
from moe_lm.parallel.pipeline import check_pipeline, split_layers
from tests.distributed.helpers import REL_TOL, spawn_ranks
from tests.distributed.workers import tiny_config
from tests.distributed.workers_pipeline import pipeline_rank

pytestmark = pytest.mark.distributed


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL_TOL * abs(b)


@pytest.mark.parametrize("schedule, microbatches", [
    ("1F1B", 2),
    pytest.param("Interleaved1F1B", 4, marks=pytest.mark.slow),  # 2 stages per rank, looped
    # zero bubble: input and weight gradients split, V placement
    pytest.param("ZBVZeroBubble", 2, marks=pytest.mark.slow),
])
def test_pipeline_2_equals_single_process(tmp_path, schedule, microbatches):
    ranks = spawn_ranks(pipeline_rank, (schedule, microbatches, None), tmp_path, timeout=240)
    for r, result in enumerate(ranks):
        assert result["ok"], result.get("traceback")
        report = result["value"]
        assert report["stages"], r
        for step in report["steps"]:
            print(schedule, r, {k: v for k, v in step.items() if k not in ("want_logs",)})
            assert _close(step["grad_norm"], step["want_grad_norm"]), step
            assert step["max_grad_diff"] <= 1e-6, step
            if "loss" in step:  # the rank of the last stage
                assert _close(step["loss"], step["want_loss"]), step
                assert _close(step["aux_loss"], step["want_aux"]), step
    # the routers of MoE blocks live on both ranks: their gradients were compared above
    assert all(ranks[r]["value"]["steps"][0]["routers"] for r in range(2))


def test_layers_split_evenly_or_as_listed():
    assert split_layers(7, 3, None) == [range(0, 3), range(3, 5), range(5, 7)]
    assert split_layers(7, 2, [2, 5]) == [range(0, 2), range(2, 7)]


@pytest.mark.parametrize("pp, schedule, microbatches, layers, change, match", [
    (4, "1F1B", 4, None, {}, r"makes 4 stages, more than model.n_layers=3"),
    (2, "Interleaved1F1B", 4, None, {}, r"makes 4 stages, more than model.n_layers=3"),
    (2, "1F1B", 1, None, {}, r"parallel.pp_microbatches=1 is fewer than the 2"),
    (2, "1F1B", 2, [1, 1], {}, r"parallel.pp_layers=\[1, 1\] must give 2 stages"),
    (2, "1F1B", 2, None, {"tie_embeddings": True}, r"model.tie_embeddings=false"),
    (2, "GPipeX", 2, None, {}, r"parallel.pp_schedule='GPipeX'"),
])
def test_impossible_pipelines_are_refused(pp, schedule, microbatches, layers, change, match):
    model = replace(tiny_config(ParallelConfig()).model, **{"tie_embeddings": False, **change})
    with pytest.raises(ConfigError, match=match):
        check_pipeline(model, pp, schedule, microbatches, layers)


def test_zero_bubble_schedules_refused_without_torchs_private_runtime(monkeypatch):
    """Their validation edits torch's private action list: a torch without it gets a ConfigError
    that names the schedules that still run, before anything is allocated."""
    cfg = tiny_config(ParallelConfig(pp=2, pp_schedule="ZBVZeroBubble", pp_microbatches=2))
    cfg = replace(cfg, model=replace(cfg.model, tie_embeddings=False, n_layers=4))
    pipeline.check_pipeline_run(cfg)  # the installed torch has it
    monkeypatch.setattr(pipeline, "_PipelineScheduleRuntime", None)
    with pytest.raises(ConfigError, match=r"private pipeline runtime.*pp_schedule=1F1B"):
        pipeline.check_pipeline_run(cfg)
    pipeline.check_pipeline_run(replace(cfg, parallel=replace(cfg.parallel, pp_schedule="1F1B")))
