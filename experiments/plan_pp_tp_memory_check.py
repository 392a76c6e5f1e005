"""The planner's per-rank peak for pp and tp layouts against real 2-process CPU runs (gloo).

    python experiments/plan_pp_tp_memory_check.py

pp: moe_lm.parallel.pipeline's stages under torch's schedule, one process per stage rank (the
Trainer's stages and schedules); tp: the Trainer's parallelize. Prints planned and measured bytes
per rank and their ratio.
"""

from moe_lm.config import ParallelConfig
from moe_lm.planning.measure import measure_training_peak_distributed
from moe_lm.planning.stage_memory import layout_memory
from tests.planning.test_counting import make_cfg
from tests.planning.test_layouts import PIPE

M2 = {"pp": 2, "pp_microbatches": 2}
LAYOUTS = [M2, {**M2, "pp_schedule": "Interleaved1F1B"}, {**M2, "pp_schedule": "ZBVZeroBubble"},
           {"tp": 2}]


def main() -> None:
    for layout in LAYOUTS:
        cfg = make_cfg(PIPE, vocab=100277)
        cfg.parallel = ParallelConfig(**layout)
        planned = layout_memory(cfg, "cpu")
        measured = measure_training_peak_distributed(cfg)
        per_rank = planned.per_pp_rank or [planned.peak] * len(measured)
        ratios = [round(p / m, 3) for p, m in zip(per_rank, measured)]
        print(f"{layout}: planned {per_rank} measured {measured} planned/measured {ratios}",
              flush=True)


if __name__ == "__main__":
    main()
