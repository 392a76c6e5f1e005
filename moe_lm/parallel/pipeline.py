"""Pipeline parallelism (`parallel.pp`) with `torch.distributed.pipelining`: stages + schedules.

Legend: B batch (of one microbatch), S sequence, D model width, N loss terms.

The Transformer is cut into `pp x stages_per_rank` stages of consecutive blocks (an even split,
or `parallel.pp_layers`: the number of blocks of each stage). A stage is a `StageModule` that holds
the same submodules under the same names as the Transformer (`embed`, `layers.<i>`, `norm`,
`lm_head`), so checkpoints (fully qualified names) do not depend on the staging. What travels from
stage to stage, per microbatch:

    x_BSD        the residual stream
    terms_N      the running sum of the MoE layers' loss terms, each already divided by the
                 number of MoE layers (the model's terms are their mean over layers): the
                 balance and z-losses of every stage reach the loss, and their gradients flow
                 back through the pipeline to the routers of every stage
    targets_BS   the next tokens (integers, no gradient), so that the last stage computes the
                 fused LM-head loss inside its own forward

The last stage returns [total, lm_loss, term values...]; the schedule's loss is its first entry.
The schedules are torch's (`get_schedule_class`): 1F1B, Interleaved1F1B, InterleavedZeroBubble
(looped: rank r holds stages r, r + pp, ...) and ZBVZeroBubble (V: rank r holds stages r and
2 pp - 1 - r).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, get_schedule_class

from moe_lm.config import ModelConfig, TrainConfig
from moe_lm.errors import ConfigError
from moe_lm.model.losses import fused_linear_cross_entropy
from moe_lm.model.moe import MoEStats
from moe_lm.model.transformer import Transformer, rotary_tables

try:  # torch-private: the forward-only (evaluation) run of the zero-bubble schedules edits them
    from torch.distributed.pipelining.schedules import (FORWARD, RECV_F, RESHARD, SEND_F,
                                                        UNSHARD, _PipelineScheduleRuntime)
except ImportError:  # another torch: check_pipeline_run refuses those schedules by name
    _PipelineScheduleRuntime = None

SCHEDULES = ("1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble")
# the schedules that split the backward into input- and weight-gradient passes
SPLIT_BACKWARD = ("InterleavedZeroBubble", "ZBVZeroBubble")


def stages_per_rank(schedule: str) -> int:
    """1 for single-stage schedules (1F1B), 2 for the multi-stage ones."""
    return 2 if issubclass(get_schedule_class(schedule), PipelineScheduleMulti) else 1


def stage_indices(pp_rank: int, pp: int, schedule: str) -> list[int]:
    """The stages rank `pp_rank` runs, in the order the schedule expects."""
    if stages_per_rank(schedule) == 1:
        return [pp_rank]
    if schedule == "ZBVZeroBubble":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(stages_per_rank(schedule))]


def check_pipeline(model: ModelConfig, pp: int, schedule: str, microbatches: int,
                   layers: list[int] | None) -> None:
    """Raises ConfigError for a pipeline layout that cannot run (call before allocating)."""
    if pp == 1:
        return
    if schedule not in SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}.")
    n_stages = pp * stages_per_rank(schedule)
    if layers is None and n_stages > model.n_layers:
        raise ConfigError(
            f"parallel.pp={pp} with parallel.pp_schedule={schedule} makes {n_stages} stages, more "
            f"than model.n_layers={model.n_layers}: every stage needs at least one block. Lower "
            "parallel.pp or use a single-stage schedule (1F1B).")
    if layers is not None and (len(layers) != n_stages or sum(layers) != model.n_layers
                               or min(layers) < 1):
        raise ConfigError(
            f"parallel.pp_layers={list(layers)} must give {n_stages} stages (pp x stages per "
            f"rank of {schedule}) at least one block each, {model.n_layers} blocks in all.")
    if microbatches < pp:
        raise ConfigError(
            f"parallel.pp_microbatches={microbatches} is fewer than the {pp} pipeline ranks: "
            f"{schedule} needs at least one microbatch per rank in flight. Raise "
            f"parallel.pp_microbatches to at least {pp} (more shrinks the bubble).")
    if model.tie_embeddings:
        raise ConfigError("parallel.pp > 1 needs model.tie_embeddings=false: the embedding lives "
                          "on the first stage, the LM head on the last.")


def step_microbatches(cfg: TrainConfig) -> int:
    """Microbatches per optimizer step under pp: parallel.pp_microbatches, or (0) one per
    trainer.grad_accum micro-batch, so that the step equals gradient accumulation exactly."""
    return cfg.parallel.pp_microbatches or cfg.trainer.grad_accum


def check_pipeline_run(cfg: TrainConfig) -> None:
    """Raises ConfigError for a training config that `parallel.pp > 1` cannot run (before
    allocating anything): the pipeline itself, how the step's batch splits into microbatches,
    and the features that do not run inside pipeline stages yet."""
    par, t = cfg.parallel, cfg.trainer
    if par.pp < 1:
        raise ConfigError(f"parallel.pp={par.pp} must be >= 1 (1 = no pipeline).")
    if par.pp == 1:
        return
    n = step_microbatches(cfg)
    check_pipeline(cfg.model, par.pp, par.pp_schedule, n, par.pp_layers)
    rows = t.grad_accum * cfg.data.batch_size
    if rows % n:
        raise ConfigError(
            f"parallel.pp_microbatches={n} does not divide the step's trainer.grad_accum="
            f"{t.grad_accum} x data.batch_size={cfg.data.batch_size} = {rows} sequences per rank: "
            "every microbatch must hold the same number. Choose a divisor (0: one microbatch per "
            "grad_accum micro-batch).")
    if stages_per_rank(par.pp_schedule) > 1 and n % max(1, n // par.pp):
        raise ConfigError(
            f"parallel.pp_schedule={par.pp_schedule} needs parallel.pp_microbatches={n} to be a "
            f"multiple of its rounds ({n // par.pp}): use a multiple of parallel.pp={par.pp}.")
    if par.pp_schedule in SPLIT_BACKWARD and _PipelineScheduleRuntime is None:
        raise ConfigError(_NO_FORWARD_ONLY.format(par.pp_schedule, torch.__version__))
    off = {"loss.distill_coef > 0": cfg.loss.distill_coef > 0,
           "loss.mtp_coef > 0": cfg.loss.mtp_coef > 0, "trainer.compile=true": t.compile,
           "trainer.eval_tasks": bool(t.eval_tasks)}
    bad = [k for k, v in off.items() if v]
    if bad:
        raise ConfigError(
            f"{', '.join(bad)} with parallel.pp > 1 is not supported yet (it needs the whole "
            "model on one rank): turn it off, or train with parallel.pp=1.")


_NO_FORWARD_ONLY = (
    "parallel.pp_schedule={} needs torch's private pipeline runtime (_PipelineScheduleRuntime."
    "pipeline_order_with_comms) to run its forward actions alone for the validation loss, and "
    "torch {} does not have it: use parallel.pp_schedule=1F1B or Interleaved1F1B, or the torch "
    "version this was tested with (2.13).")


def split_layers(n_layers: int, n_stages: int, layers: list[int] | None) -> list[range]:
    """The blocks of each stage: `layers` (blocks per stage) or an even split (earlier stages
    take the remainder)."""
    counts = list(layers) if layers is not None else [
        n_layers // n_stages + (i < n_layers % n_stages) for i in range(n_stages)]
    starts = [sum(counts[:i]) for i in range(n_stages)]
    return [range(s, s + c) for s, c in zip(starts, counts)]


class Blocks(nn.ModuleDict):
    """Some of a Transformer's blocks under their own indices ("layers.<i>" stays the name);
    iterates over the blocks, as the Transformer's ModuleList does (activation checkpointing,
    FSDP and the Trainer walk `model.layers`)."""

    def __iter__(self):
        return iter(self.values())


class StageModule(nn.Module):
    """One pipeline stage of a Transformer: its blocks, plus the embedding on the first stage and
    the final norm and LM head on the last, under the Transformer's own names.

    Each forward appends (MoE layer index in the whole model, stats) of its MoE layers to
    `recorded` (the Trainer's routing metrics and aux-free balancing read and clear it);
    `autocast` is the context the forward runs in (the run's precision)."""

    def __init__(self, model: Transformer, blocks: range, first: bool, last: bool,
                 term_coefs: dict[str, float], n_moe_layers: int):
        super().__init__()
        self.cfg, self.first, self.last = model.cfg, first, last
        self.term_names = list(term_coefs)
        self.coefs = [term_coefs[n] for n in self.term_names]  # floats: no meta-built buffer
        self.n_moe_layers = max(n_moe_layers, 1)
        self.embed = model.embed if first else None
        self.layers = Blocks({str(i): model.layers[i] for i in blocks})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        moe_ids = [i for i, b in enumerate(model.layers) if b.is_moe]
        self.moe_index = {str(i): moe_ids.index(i) for i in blocks if i in moe_ids}
        self.recorded: list[tuple[int, MoEStats]] = []
        self.autocast = nullcontext

    init_weights = Transformer.init_weights  # the same rules, by name

    def blocks(self) -> list[nn.Module]:
        return list(self.layers.values())

    def forward(self, x, terms_N=None, targets_BS=None):
        with self.autocast():
            return self._forward(x, terms_N, targets_BS)

    def _forward(self, x, terms_N, targets_BS):
        if self.first:  # x: the (B, S+1) token batch
            x, targets_BS = self.embed(x[:, :-1]), x[:, 1:].contiguous()  # contiguous: sent
            terms_N = torch.zeros(len(self.term_names), device=x.device)
        rope_SF2 = rotary_tables(x.shape[1], self.cfg.head_width, self.cfg.rope_theta, x.device)
        for key, layer in self.layers.items():
            x, stats = layer(x, rope_SF2, None)
            if stats is not None:
                self.recorded.append((self.moe_index[key], stats))
                terms_N = terms_N + torch.stack(
                    [stats.terms[n].value.float() for n in self.term_names]) / self.n_moe_layers
        if not self.last:
            return x, terms_N, targets_BS
        h_ND = self.norm(x).flatten(0, 1)
        lm_loss = fused_linear_cross_entropy(h_ND, self.lm_head.weight, targets_BS.flatten())
        total = lm_loss + (terms_N * torch.tensor(self.coefs, device=x.device)).sum()
        return torch.cat([total.reshape(1), lm_loss.reshape(1).float(), terms_N])


class PipelineParts(nn.Module):
    """What one pipeline rank holds of a Transformer (the blocks of all its stages, and embedding,
    final norm and LM head where its stages have them), under the Transformer's names: the
    optimizer, the seeded init and the checkpoints (fully qualified names) see this module, so
    they do not depend on the staging. `stages` run it (they share these submodules)."""

    def __init__(self, model: Transformer, stages: list[StageModule]):
        super().__init__()
        self.cfg = model.cfg
        self.stages = list(stages)  # a plain list: no second name for any weight
        self.embed = model.embed if any(s.first for s in stages) else None
        blocks = {k: b for s in stages for k, b in s.layers.items()}
        self.layers = Blocks({k: blocks[k] for k in sorted(blocks, key=int)})
        self.norm = model.norm if any(s.last for s in stages) else None
        self.lm_head = model.lm_head if any(s.last for s in stages) else None
        self.moe_index = {k: i for s in stages for k, i in s.moe_index.items()}

    init_weights = Transformer.init_weights  # the same rules, by name


def term_coefs(model: Transformer) -> dict[str, float]:
    """The MoE layers' loss-term names and coefficients, from a shape-only forward of one."""
    moe = next((b.mlp for b in model.layers if b.is_moe), None)
    if moe is None:
        return {}
    with torch.device("meta"):  # the router alone: the terms are its own
        routing = moe.router(torch.zeros(2, model.cfg.d_model))
        terms = moe.router.loss_terms(routing, moe.dispatcher, 2)
    return {name: term.coef for name, term in terms.items()}


def build_stage_modules(model: Transformer, pp_rank: int, pp: int, schedule: str,
                        layers: list[int] | None) -> tuple[list[int], list[StageModule]]:
    """(stage indices, stage modules) of this pipeline rank, cut from a meta-built model."""
    n_stages = pp * stages_per_rank(schedule)
    ranges = split_layers(len(model.layers), n_stages, layers)
    coefs = term_coefs(model)
    n_moe = sum(b.is_moe for b in model.layers)
    ids = stage_indices(pp_rank, pp, schedule)
    return ids, [StageModule(model, ranges[i], i == 0, i == n_stages - 1, coefs, n_moe)
                 for i in ids]


def stage_io(module: StageModule, micro_BS1: tuple[int, int]) -> tuple[tuple, tuple]:
    """(inputs, outputs) of a stage for one microbatch of `micro_BS1` tokens, as meta tensors:
    given to the stages so that torch need not run a forward on placeholder data to learn them
    (placeholder token ids would index out of the vocabulary)."""
    B, S1 = micro_BS1
    meta = torch.device("meta")
    between = (torch.empty(B, S1 - 1, module.cfg.d_model, device=meta, requires_grad=True),
               torch.empty(len(module.term_names), device=meta, requires_grad=True),
               torch.empty(B, S1 - 1, dtype=torch.long, device=meta))
    inputs = (torch.empty(B, S1, dtype=torch.long, device=meta),) if module.first else between
    outputs = (torch.empty(2 + len(module.term_names), device=meta),) if module.last else between
    return inputs, outputs


def build_schedule(modules: list[StageModule], ids: list[int], pp: int, schedule: str,
                   microbatches: int, micro_BS1: tuple[int, int], device: torch.device, group,
                   forward_only: bool = False):
    """torch's schedule over this rank's stages; its loss is the first entry of the last
    stage's output (gradients are averaged over the microbatches). `forward_only`: for
    `eval()` (the validation loss)."""
    n_stages = pp * stages_per_rank(schedule)
    stages = []
    for m, i in zip(modules, ids):
        inputs, outputs = stage_io(m, micro_BS1)
        stages.append(PipelineStage(m, i, n_stages, device, input_args=inputs,
                                    output_args=outputs, group=group))
    cls = get_schedule_class(schedule)

    def loss_fn(out, target):
        return out[0].clone()  # not a view: zero-bubble schedules detach the loss in place

    if not issubclass(cls, PipelineScheduleMulti):
        return cls(stages[0], n_microbatches=microbatches, loss_fn=loss_fn)
    built = cls(stages, n_microbatches=microbatches, loss_fn=loss_fn)
    order = (getattr(built, "pipeline_order_with_comms", None)
             if _PipelineScheduleRuntime is not None
             and isinstance(built, _PipelineScheduleRuntime) else None)
    if forward_only and order is not None:
        # torch's eval() runs the schedule's whole action list, and ZBVZeroBubble's holds
        # backward-input actions that fail without a backward: keep its forward actions, their
        # sends and receives and the stages' unshard/reshard, in torch's order (torch's own
        # lowering would refuse a schedule without backwards)
        keep = (FORWARD, SEND_F, RECV_F, UNSHARD, RESHARD)
        built.pipeline_order_with_comms = {
            rank: [a for a in actions if a.computation_type in keep]
            for rank, actions in order.items()}
    elif forward_only and schedule in SPLIT_BACKWARD:
        raise ConfigError(_NO_FORWARD_ONLY.format(schedule, torch.__version__))
    return built


def pipeline_step(schedule, stage_modules: list[StageModule], batch_BS1: torch.Tensor,
                  backward: bool = True, mean: bool = True) -> torch.Tensor | None:
    """One pipelined forward (+ backward) of the whole batch over the microbatches. Returns the
    microbatches' mean [total, lm_loss, terms...] (`mean=False`: one row per microbatch) on the
    rank holding the last stage, else None."""
    first = any(m.first for m in stage_modules)
    args = (batch_BS1,) if first else ()
    dummy = torch.zeros(batch_BS1.shape[0], 1)  # the loss needs no target: it rides along
    run = schedule.step if backward else schedule.eval
    out = run(*args, target=dummy)
    if not any(m.last for m in stage_modules):
        return None
    rows = out.reshape(-1, 2 + len(stage_modules[-1].term_names))
    return rows.mean(0) if mean else rows
