"""The Trainer's pipeline-parallel step (`parallel.pp > 1`): torch's schedule over this rank's stages.

    runner = PipelineRunner(cfg, meta_model, mesh, precision)   # stages of this pp rank
    runner.parts                                                # what the optimizer, init and
                                                                # checkpoints see (the FQNs of
                                                                # the Transformer)
    runner.build(device)                                        # after init: the schedules
    logs, stats = runner.train_step(batches)                    # one optimizer step's grads

Legend: n microbatches per step, L MoE layers of the whole model, E experts.

A step's `trainer.grad_accum` loader batches are concatenated and cut into n microbatches
(`step_microbatches`); with n = grad_accum each microbatch is one loader batch, so the step
equals gradient accumulation in one process (torch scales the gradients by 1/n). Only the last
stage has the losses: they are summed over the pipeline group (the other stages add zeros), so
that every rank logs, checks for non-finite values and skips a bad update alike. The routing
statistics come from every stage: each rank fills its MoE layers' rows of a whole-model list
(zeros elsewhere), so the sums over ranks the Trainer already takes see every layer once per
data-parallel rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule

from moe_lm.config import TrainConfig
from moe_lm.model import Transformer
from moe_lm.model.moe import MoEStats
from moe_lm.parallel import parallelize, seeded_init
from moe_lm.parallel.pipeline import (SPLIT_BACKWARD, PipelineParts, build_schedule,
                                      build_stage_modules, pipeline_step, step_microbatches)
from moe_lm.parallel.precision import Precision


class PipelineRunner:
    """This pipeline rank's stages, parallelised inside the stage (FSDP2, EP, AC), and the
    schedules that run them: one for training steps, one for evaluation batches."""

    def __init__(self, cfg: TrainConfig, model: Transformer, mesh: DeviceMesh,
                 precision: Precision):
        par = cfg.parallel
        self.cfg, self.mesh, self.precision = cfg, mesh, precision
        self.group = mesh["pp"].get_group()
        self.ids, self.stages = build_stage_modules(model, mesh["pp"].get_local_rank(), par.pp,
                                                    par.pp_schedule, par.pp_layers)
        self.parts = PipelineParts(model, self.stages)
        # torch's split backward (zero-bubble schedules) takes the stage's weights as they are
        # registered when the input-gradient pass starts: resharded blocks would hold their
        # sharded parameters then, not the gathered ones of the graph, and their weight
        # gradients would be lost; so the blocks stay gathered from forward to backward
        split = par.pp_schedule in SPLIT_BACKWARD
        for stage in self.stages:  # each stage is its own FSDP root
            parallelize(stage, mesh, cfg, precision, reshard_after_forward=not split)
        self.n = step_microbatches(cfg)
        self.n_moe = sum(b.is_moe for b in model.layers)
        # this rank's MoE layers, in the order of its routers: their indices in the whole model
        self.moe_ids = [self.parts.moe_index[k] for k, b in self.parts.layers.items() if b.is_moe]
        self.term_names = self.stages[0].term_names
        self.num_experts = cfg.expert.num_experts
        self.schedule = self.eval_schedule = None

    def build(self, device: torch.device, seed: int) -> None:
        """Allocates this rank's weights on `device` (the seeded init, by the Transformer's
        names: the same values as one process) and builds the schedules."""
        par, d, t = self.cfg.parallel, self.cfg.data, self.cfg.trainer
        self.device = device
        for stage in self.stages:  # the FSDP roots: they re-register their shards
            stage.to_empty(device=device)
        with seeded_init(self.parts, seed):
            self.parts.init_weights()
        for stage in self.stages:
            stage.autocast = lambda: self.precision.autocast(device.type)
        micro = (t.grad_accum * d.batch_size // self.n, d.seq_len + 1)
        self.schedule = build_schedule(self.stages, self.ids, par.pp, par.pp_schedule, self.n,
                                       micro, device, self.group)
        self.eval_schedule = build_schedule(self.stages, self.ids, par.pp,
                                            par.pp_schedule,
                                            self.n, (d.batch_size, d.seq_len + 1), device,
                                            self.group, forward_only=True)

    def _from_last_stage(self, out: torch.Tensor | None, width: int) -> torch.Tensor:
        """The last stage's values on every rank of the pipeline group."""
        values = out.detach().float() if out is not None else torch.zeros(width,
                                                                           device=self.device)
        dist.all_reduce(values, group=self.group)
        return values

    def _recorded(self) -> list[list[MoEStats]]:
        """Per microbatch, a whole-model list of MoE stats (zeros for other ranks' layers)."""
        rows = [[self._zero_stats() for _ in range(self.n_moe)] for _ in range(self.n)]
        for stage in self.stages:
            per_mb = len(stage.recorded) // self.n  # the stage's forwards, in microbatch order
            for k, (layer, stats) in enumerate(stage.recorded):
                rows[k // per_mb][layer] = MoEStats({}, stats.tokens_per_expert.detach().float(),
                                                    torch.as_tensor(stats.dropped_frac).detach()
                                                    .float(), stats.entropy.detach().float())
            stage.recorded.clear()
        return rows

    def _zero_stats(self) -> MoEStats:
        zero = torch.zeros((), device=self.device)
        return MoEStats({}, torch.zeros(self.num_experts, device=self.device), zero, zero)

    def train_step(self, batches: list[torch.Tensor]
                   ) -> tuple[dict[str, torch.Tensor], list[list[MoEStats]]]:
        """Forward + backward of one optimizer step's batches; (mean losses by name, per
        microbatch the whole-model routing stats)."""
        out = pipeline_step(self.schedule, self.stages, torch.cat(batches))
        values = self._from_last_stage(out, 2 + len(self.term_names))
        logs = {"loss": values[0], "lm_loss": values[1],
                **{name: values[2 + i] for i, name in enumerate(self.term_names)}}
        return logs, self._recorded()

    def whole_model(self, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-MoE-layer tensors of this rank's layers (at indices `moe_ids` of the whole model)
        -> those of every layer, from the ranks that hold them."""
        full = torch.zeros(self.n_moe, self.num_experts, device=self.device)
        for row, i in zip(rows, self.moe_ids):
            full[i] = row.detach().float()
        dist.all_reduce(full, group=self.group)
        return list(full)

    @torch.no_grad()
    def val_loss_sum(self, batches: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(sum of the batches' LM losses, how many), on every rank of the pipeline group. The
        batches go through in groups of n microbatches, the last group padded by repetition
        (the padding's losses are left out)."""
        total, count = torch.zeros((), device=self.device), len(batches)
        for start in range(0, count, self.n):
            group = batches[start:start + self.n]
            real = len(group)
            group = group + [group[-1]] * (self.n - real)
            out = pipeline_step(self.eval_schedule, self.stages, torch.cat(group),
                                backward=False, mean=False)
            if out is not None:
                total = total + out[:real, 1].float().sum()
        for stage in self.stages:
            stage.recorded.clear()
            if isinstance(stage, FSDPModule):  # an eval forward leaves a root's weights gathered
                stage.reshard()
        return self._from_last_stage(total.reshape(1), 1)[0], count
