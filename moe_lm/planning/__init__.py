"""Planning a run before spending hardware on it: counts, per-rank memory, launch checks, dry run.

    plan = make_plan(cfg)            # parameters, FLOPs, per-GPU memory, min GPUs, time to train
    print(format_plan(plan))
"""

from moe_lm.planning.counting import (
    count_by_component,
    flops_per_token,
    totals,
    with_tokenizer_vocab,
)
from moe_lm.planning.memory import RankMemory, measure_rank_memory, rank_memory
from moe_lm.planning.report import format_plan, make_plan, write_plan

__all__ = ["RankMemory", "count_by_component", "flops_per_token", "format_plan", "make_plan",
           "measure_rank_memory", "rank_memory", "totals", "with_tokenizer_vocab", "write_plan"]
