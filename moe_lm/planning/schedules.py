"""What a pipeline schedule means for one rank's memory and for the step time.

In-flight microbatches are read from torch's own schedule: the planner builds the schedule class
`parallel.pp_schedule` names (`torch.distributed.pipelining`) over stand-in stages (only their
index, count and rank are read; torch's schedule tests do the same) and walks the action list
each rank runs. A microbatch's saved activations on a stage are held from its forward (F) to its
last backward action: the full backward (B), or, for the zero-bubble schedules that split the
backward, the weight backward (W) (the input backward I frees most of them already; counting to
W is the conservative bound). On 1F1B the first rank holds `pp` microbatches before its first
backward; Interleaved1F1B's first rank holds more (warm-up of `2 (pp-1) + (v-1) pp + 1` stage
chunks of `1/v` of a rank's layers: Narayanan et al. 2021, arXiv 2104.04473, Sec. 2.2).

The bubble (idle share of a step) is analytic, per schedule (p = pp, m = microbatches, v = stages
per rank), with forward, input-backward and weight-backward times taken equal:
    1F1B                   step = ideal x (m + p - 1) / m     (bubble (p-1)/(m+p-1); GPipe/1F1B,
                           Narayanan et al. 2021 Sec. 2.2.1)
    Interleaved1F1B        step = ideal x (1 + (p - 1) / (v m))          (ibid. Sec. 2.2.2)
    InterleavedZeroBubble  step = ideal x (1 + (p - 1) / (3 v m)): ZB-H1's bubble is a third of
                           1F1B's ((p-1)(T_F + T_B - T_W) vs (p-1)(T_F + T_B + T_W); Qi et al.
                           2024, arXiv 2401.10241, Sec. 3.1), applied to the interleaved one
    ZBVZeroBubble          step = ideal: ZB-V has no bubble when T_F = T_B = T_W and m >= 2p
                           (ibid. Sec. 6; torch's docstring says the same), else the ZB-H1 term
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

from torch import nn
from torch.distributed.pipelining.schedules import (PipelineScheduleMulti, _ComputationType,
                                                    get_schedule_class)

from moe_lm.parallel.pipeline import stage_indices, stages_per_rank

_FORWARD = {_ComputationType.FORWARD}
_RELEASE_FULL = {_ComputationType.FULL_BACKWARD}
_RELEASE_SPLIT = {_ComputationType.BACKWARD_WEIGHT}


def pipeline_order(schedule: str, pp: int, microbatches: int) -> dict[int, list]:
    """torch's action list of every pipeline rank for `schedule` (computations only)."""
    cls = get_schedule_class(schedule)
    n_stages = pp * stages_per_rank(schedule)
    stand_ins = [SimpleNamespace(num_stages=n_stages, group_size=pp, group_rank=0, stage_index=i,
                                 is_first=i == 0, is_last=i == n_stages - 1, submod=nn.Module())
                 for i in stage_indices(0, pp, schedule)]
    if issubclass(cls, PipelineScheduleMulti):
        order = cls(stand_ins, n_microbatches=microbatches).pipeline_order
    else:
        order = cls(stand_ins[0], n_microbatches=microbatches).pipeline_order
    return {rank: [a for a in actions if a is not None] for rank, actions in order.items()}


@lru_cache(maxsize=None)
def held_microbatches(schedule: str, pp: int, microbatches: int) -> dict[int, list[tuple]]:
    """{pp rank: [(stage of the action, {stage: microbatches held}) per computing action]}:
    what the rank holds while it runs each forward or backward (cached: read it, never change
    it)."""
    order = pipeline_order(schedule, pp, microbatches)
    split = any(a.computation_type == _ComputationType.BACKWARD_WEIGHT
                for actions in order.values() for a in actions)
    release = _RELEASE_SPLIT if split else _RELEASE_FULL
    compute = _FORWARD | release | {_ComputationType.BACKWARD_INPUT}
    out = {}
    for rank, actions in order.items():
        held = dict.fromkeys(stage_indices(rank, pp, schedule), 0)
        rows = []
        for a in actions:
            if a.computation_type not in compute:
                continue
            if a.computation_type in _FORWARD:
                held[a.stage_index] += 1
            rows.append((a.stage_index, dict(held)))
            if a.computation_type in release:
                held[a.stage_index] -= 1
        out[rank] = rows
    return out


def step_time_factor(schedule: str, pp: int, microbatches: int) -> float:
    """Step time over the bubble-free time (>= 1); see the module docstring for the sources."""
    if pp == 1:
        return 1.0
    p, m, v = pp, microbatches, stages_per_rank(schedule)
    if schedule == "1F1B":
        return (m + p - 1) / m
    if schedule == "Interleaved1F1B":
        return 1 + (p - 1) / (v * m)
    if schedule == "ZBVZeroBubble" and m >= 2 * p:
        return 1.0
    return 1 + (p - 1) / (3 * v * m)


def bubble_share(schedule: str, pp: int, microbatches: int) -> float:
    """The idle share of a step: 1 - 1 / step_time_factor."""
    return 1.0 - 1.0 / step_time_factor(schedule, pp, microbatches)
