"""The training loop: data -> model -> loss -> AdamW -> clip -> step, with evals and checkpoints.

`run_training(cfg, run_dir)` is the whole run, resumable: started in a run directory that holds a
complete checkpoint, it continues from the newest one with identical results.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from moe_lm.config import TrainConfig
from moe_lm.data import get_tokenizer, open_run_data
from moe_lm.errors import CheckpointError, MoeLMError
from moe_lm.model import Transformer
from moe_lm.training.objectives import ExtraObjectives
from moe_lm.model.moe import MoEStats
from moe_lm.model.routers import Router
from moe_lm.parallel import build_mesh, clip_grad_norm_, init_on_device, parallelize, validate_layout
from moe_lm.parallel.mesh import data_parallel_coords
from moe_lm.parallel.pipeline import check_pipeline_run
from moe_lm.parallel.tensor_parallel import check_tensor_parallel
from moe_lm.parallel.precision import Precision
from moe_lm.training import distributed as dist_utils
from moe_lm.training.compile import compile_blocks
from moe_lm.training.final_weights import keep_final_weights_only, refuse_weights_only
from moe_lm.training.cpu_memory import keep_freed_cpu_memory
from moe_lm.training.checkpoint import (check_identity, list_checkpoints, load_checkpoint,
                                       model_identity, save_checkpoint)
from moe_lm.training.resume import fresh_hparams, pick_resume_checkpoint, reapply_hparams
from moe_lm.training.metrics import MetricsLogger, RoutingAccumulator, score_bias_metrics
from moe_lm.training.routing_monitor import RoutingMonitor, heatmap_path
from moe_lm.training.sigterm import sigterm_sets
from moe_lm.training.nonfinite import NonFiniteGuard, TrainingError
from moe_lm.training.optim import build_optimizer, build_scheduler
from moe_lm.training.pipeline_step import PipelineRunner
from moe_lm.training.step import forward_backward
from moe_lm.training.summary import end_summary, mixture_plan, mixture_seen, start_summary
from moe_lm.training.trained_model import load_model_weights, resolve_checkpoint
from moe_lm.training.warm_start import warm_start_config


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA where present; `cuda` without CUDA is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MoeLMError("trainer.device=cuda but no CUDA device is visible: use trainer.device=cpu "
                         "(or auto), or run on a machine with a GPU.")
    return torch.device(name)


class Trainer(NonFiniteGuard):
    """Holds one run's model, optimizer, data and logger; `fit()` trains to the end."""

    def __init__(self, cfg: TrainConfig, run_dir: Path,
                 task_eval: Callable[..., dict[str, float]] | None = None):
        # task_eval(model, tokenizer, step) -> {"eval/<task>/<metric>": value}: the lm-eval tasks
        # of trainer.eval_tasks, built by the caller (inference sits above the training layer)
        self.task_eval = task_eval
        self.run_dir = Path(run_dir)
        self.device = resolve_device(cfg.trainer.device)
        if self.device.type == "cpu":
            keep_freed_cpu_memory()  # large CPU tensors reuse the heap instead of page faults
        check_tensor_parallel(cfg)
        check_pipeline_run(cfg)
        validate_layout(cfg.parallel, cfg.expert, dist_utils.world_size(), self.device.type)
        torch.manual_seed(cfg.trainer.seed)
        tokenizer = get_tokenizer(cfg.data.tokenizer)
        # the ranks of a tensor-parallel group read the same batch
        r, w = data_parallel_coords(cfg.parallel, dist_utils.rank(), dist_utils.world_size())
        d, self.dp_size = cfg.data, w
        self.data = open_run_data(d, tokenizer, cfg.trainer.seed, r, w)  # bad data fails here
        if cfg.model.vocab_size <= 0:
            cfg = replace(cfg, model=replace(cfg.model, vocab_size=tokenizer.n_vocab))
        elif cfg.model.vocab_size < tokenizer.n_vocab:
            raise MoeLMError(f"model.vocab_size={cfg.model.vocab_size} is smaller than tokenizer "
                             f"{tokenizer.name}'s {tokenizer.n_vocab} tokens: set it to 0 (take the "
                             "tokenizer's) or at least that.")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.precision = Precision.resolve(cfg.trainer.precision, self.device.type)
        self.routing = RoutingAccumulator()
        self.mesh = build_mesh(cfg.parallel, self.device.type, cfg.expert)  # None: one process
        with torch.device("meta"):  # shapes only: each rank then allocates just its own shards
            self.model = Transformer(cfg.model, cfg.expert, cfg.loss)
        self.pipeline: PipelineRunner | None = None  # parallel.pp > 1: this rank's stages
        if cfg.parallel.pp > 1:
            self.pipeline = PipelineRunner(cfg, self.model, self.mesh, self.precision)
            self.model = self.pipeline.parts  # the Transformer's names, this rank's weights
            self.pipeline.build(self.device, cfg.trainer.seed)  # same values for any layout
            self.routing.owner_group = self.pipeline.group
        else:
            parallelize(self.model, self.mesh, cfg, self.precision)
            init_on_device(self.model, self.device, cfg.trainer.seed)  # same values, any layout
        if cfg.init.from_checkpoint and not list_checkpoints(self.run_dir, warn=False):
            self.start_from(resolve_checkpoint(cfg.init.from_checkpoint)[0])
        if cfg.trainer.compile:
            compile_blocks(self.model, self.device)
        # distillation teacher / MTP modules (attached as model.mtp, so before the optimizer)
        self.objectives = ExtraObjectives(cfg, self.model, self.device, tokenizer.name)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.trainer.max_steps)
        self.train_data = self.data.train
        self.step, self.tokens_seen = 0, 0
        self.monitor = RoutingMonitor(cfg.trainer.monitor)
        self.stop_requested = False
        self.reset_nonfinite()
        self._last_logged = (0, time.time())  # (step, wall time) of the last logged row
        self._loss_keys: tuple[str, ...] = ()  # names of the losses in train_step's rows

    @property
    def identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed by this run."""
        return model_identity(self.cfg, self.tokenizer.name)

    def start_from(self, ckpt) -> None:
        """Takes a checkpoint's model weights only (init.from_checkpoint, or a weights-only
        checkpoint such as moe_lm.import_hf writes): optimizer, schedule and data start fresh."""
        check_identity(ckpt, self.identity)
        load_model_weights(ckpt, self.model)
        if dist_utils.is_rank0():
            print(f"starting from the weights of {ckpt.path} (fresh optimizer and schedule)",
                  flush=True)

    def resume_if_possible(self) -> bool:
        """Loads the checkpoint `trainer.resume` picks (see `moe_lm.training.resume`), if any.

        Refuses (CheckpointError, nothing written) checkpoints that all fail their checks and
        changed config keys that would silently alter the run; applies the others."""
        ckpt = pick_resume_checkpoint(self.run_dir, self.cfg, self.identity)
        if ckpt is None:
            return False
        refuse_weights_only(ckpt)  # a finished run's final weights (trainer.final_weights_only)
        if ckpt.meta.get("weights_only"):  # e.g. written by moe_lm.import_hf: weights only
            self.start_from(ckpt)
            return False
        fresh = fresh_hparams(self.optimizer)  # this run's lr, weight decay, betas, eps
        state = load_checkpoint(ckpt, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        reapply_hparams(self.optimizer, self.scheduler, fresh)
        self.check_batch_layout(state, ckpt.path)
        self.train_data.load_state_dict(state["data"])
        self.step, self.tokens_seen = state["step"], state["tokens"]
        if dist_utils.is_rank0():
            print(f"resumed from {ckpt.path} at step {self.step}", flush=True)
        return True

    @property
    def windows_per_batch(self) -> int:
        """Sequences one loader position spans over all ranks (data.batch_size x data-parallel
        size)."""
        return self.cfg.data.batch_size * self.dp_size

    def check_batch_layout(self, state: dict[str, Any], path: Path) -> None:
        """A checkpoint's data position counts global batches: they must stay the same size."""
        saved = state.get("windows_per_batch", self.windows_per_batch)
        if saved != self.windows_per_batch:
            raise CheckpointError(
                f"The checkpoint {path} was saved with {saved} sequences per step over all ranks, "
                f"this run has {self.windows_per_batch} (data.batch_size="
                f"{self.cfg.data.batch_size} x {self.dp_size} data-parallel rank(s)); its data "
                "position would point elsewhere. Set data.batch_size so that data.batch_size x "
                f"world size = {saved} to resume it under this layout.")

    def save(self) -> None:
        state = {"step": self.step, "tokens": self.tokens_seen,
                 "scheduler": self.scheduler.state_dict(), "data": self.train_data.state_dict(),
                 "windows_per_batch": self.windows_per_batch}
        save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state, self.identity,
                        self.cfg.trainer.keep_last, config=asdict(self.cfg))

    def train_step(self) -> dict[str, Any]:
        """One optimizer update over `grad_accum` micro-batches; returns its metrics row."""
        t = self.cfg.trainer
        self.model.train()
        sums: dict[str, Any] = {}  # the micro-steps' mean of every logged loss, by name
        step_loads: list[torch.Tensor] = []  # per MoE layer, tokens per expert over micro-steps
        extra = self.objectives if self.objectives.active else None
        per_micro: list[list[MoEStats]] = []  # each micro-batch's MoE stats, by layer
        if self.pipeline is not None:  # the schedule runs the step's microbatches
            sums, per_micro = self.pipeline.train_step([self.next_batch()
                                                        for _ in range(t.grad_accum)])
        else:
            for _ in range(t.grad_accum):
                result = forward_backward(self.model, self.next_batch(), self.precision,
                                          self.device.type, extra, grad_divisor=t.grad_accum)
                per_micro.append(result.out.moe_stats)
                for key, value in result.logs.items():
                    sums[key] = sums.get(key, 0.0) + value / t.grad_accum
        for moe_stats in per_micro:
            self.routing.add(moe_stats)
            step_loads = [s.tokens_per_expert + (step_loads[i] if step_loads else 0)
                          for i, s in enumerate(moe_stats)]
        self._loss_keys = tuple(sums)
        pp_group = self.pipeline.group if self.pipeline is not None else None
        grad_norm = clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip,
                                    pp_group=pp_group)  # of the whole model
        self.skip_update_if_nonfinite(sums["loss"], grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.balance_routers(step_loads)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        d = self.cfg.data
        step_tokens = t.grad_accum * d.batch_size * d.seq_len * self.dp_size
        self.tokens_seen += step_tokens
        # device tensors until `finish_row` reads them at a logging step: no host-device sync here
        return {"step": self.step, **sums, "lr": lr, "grad_norm": grad_norm,
                "tokens": self.tokens_seen, "step_tokens": step_tokens}

    def next_batch(self) -> torch.Tensor:
        return self.train_data.next_batch().to(self.device, non_blocking=True)

    def finish_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """A `train_step` row as logged: losses averaged over ranks, floats, measured speed."""
        self.check_finite()
        now = time.time()
        steps = row["step"] - self._last_logged[0]
        elapsed = (now - self._last_logged[1]) / max(steps, 1)  # per step, since the last row
        self._last_logged = (row["step"], now)
        row = dict(row)
        step_tokens = row.pop("step_tokens")
        losses = {k: row[k] for k in self._loss_keys}
        return {**row, **dist_utils.mean_over_ranks(losses, self.device),
                "grad_norm": float(row["grad_norm"]),
                "tokens_per_s": step_tokens / max(elapsed, 1e-9), "step_time": elapsed}

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean LM loss over `trainer.eval_batches` fixed validation batches (of each source of a
        mixture: `val/<name>/loss`, and `val_loss` their mean under the mixture's weights)."""
        self.model.eval()
        rows = self.data.eval_row({n: self._val_loss(self.val_batches(n)) for n in self.data.val})
        row = {"step": self.step, **rows, "val_ppl": math.exp(min(rows["val_loss"], 50.0))}
        if self.task_eval is not None:  # every rank runs them (sharded weights), rank 0 logs
            row.update(self.task_eval(self.model, self.tokenizer, self.step))
        return row

    def _val_loss(self, batches: Iterator[torch.Tensor]) -> float:
        total, n = torch.zeros((), device=self.device), 0
        if self.pipeline is not None:  # through the stages; the last one's losses, on all ranks
            total, n = self.pipeline.val_loss_sum([b.to(self.device) for b in batches])
        else:
            for batch in batches:
                batch = batch.to(self.device)
                with self.precision.autocast(self.device.type):
                    out = self.model(batch[:, :-1], batch[:, 1:], return_logits=False)
                total += out.lm_loss.float()
                n += 1
        if dist_utils.is_initialized():
            torch.distributed.all_reduce(total)
            total /= dist_utils.world_size()
        return float(total / max(n, 1))

    def routers(self) -> list[Router]:
        """This rank's MoE layers' routers, in layer order (the order of `ModelOutput.moe_stats`;
        under pp those of this rank's stages: `pipeline.moe_ids` gives their whole-model index)."""
        return [m for m in self.model.modules() if isinstance(m, Router)]

    @torch.no_grad()
    def balance_routers(self, loads: list[torch.Tensor]) -> None:
        """aux_free: nudges each router's selection bias from this step's load over all ranks."""
        rate = self.cfg.expert.bias_update_rate
        if rate <= 0 or not loads:
            return
        load_LE = torch.stack(loads).float()
        if dist_utils.is_initialized():
            torch.distributed.all_reduce(load_LE)
        if self.pipeline is not None:  # the rows of this rank's layers
            load_LE = load_LE[self.pipeline.moe_ids]
        for router, load_E in zip(self.routers(), load_LE):
            router.update_score_bias(load_E, rate)

    def score_biases(self) -> list[torch.Tensor]:
        """Every MoE layer's selection bias (under pp gathered from the stages that hold them)."""
        biases = [r.score_bias for r in self.routers()]
        if self.pipeline is None:
            return biases
        return self.pipeline.whole_model(biases)

    def plot_routing(self, logger: MetricsLogger) -> None:
        """The expert-load heatmap PNG of the run so far, also sent to wandb (rank 0)."""
        if not (self.cfg.trainer.monitor.heatmap and dist_utils.is_rank0()):
            return
        path = self.monitor.write_heatmap(heatmap_path(self.run_dir, self.step), self.step)
        if path is not None:
            logger.log_image("moe/expert_load_heatmap", path, self.step)

    def val_batches(self, source: str = "") -> Iterator[torch.Tensor]:
        return self.data.val[source].val_batches(self.cfg.trainer.eval_batches)

    def fit(self, logger: MetricsLogger) -> dict[str, Any]:
        """Trains until `stop_at` / `max_steps` or SIGTERM; always checkpoints at the end."""
        t = self.cfg.trainer
        end = t.stop_at or t.max_steps
        last_eval: dict[str, Any] = {}
        if self.step == 0:
            last_eval = self.evaluate()
            logger.log(last_eval), logger.console(last_eval)
        self._last_logged = (self.step, time.time())
        with sigterm_sets(self):
            while self.step < end:
                row = self.train_step()
                if self.step % t.log_every == 0 or self.step == end:
                    row = self.finish_row(row)
                    row.update(self.routing.metrics())
                    if self.cfg.expert.bias_update_rate > 0:
                        row.update(score_bias_metrics(self.score_biases()))
                    logger.log(row)
                    logger.console(row)
                    for alert in self.monitor.observe(row):
                        logger.alert(alert.title, alert.text)
                    self.routing.reset()
                if self.step % t.eval_every == 0 or self.step == end:
                    self.check_finite()
                    last_eval = self.evaluate()
                    logger.log(last_eval), logger.console(last_eval)
                    self.plot_routing(logger)
                stopping = dist_utils.any_rank_true(self.stop_requested, self.device)
                if self.step % t.ckpt_every == 0 or self.step == end or stopping:
                    self.check_finite()  # never a checkpoint after an unchecked step
                    self.save()
                if stopping:
                    if dist_utils.is_rank0():
                        print(f"SIGTERM: checkpointed step {self.step}, exiting.", flush=True)
                    break
        if not last_eval:
            last_eval = self.evaluate()
        # the step reached (after SIGTERM later than the last eval's) and that eval's own step
        return {**last_eval, "val_step": last_eval["step"], "step": self.step}


def run_training(cfg: TrainConfig, run_dir: Path,
                 task_eval: Callable[..., dict[str, float]] | None = None,
                 on_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Builds everything, resumes if the run directory holds a checkpoint, trains, logs.

    `task_eval` (see `Trainer`) adds the lm-eval task metrics to every evaluation row; `on_start`
    runs once the resume is decided (what the entry point records as the config that ran: a
    refused resume records nothing).

    Under torchrun it first checks the layout against the world size, then joins the process
    group (and leaves it at the end, also after an error).
    """
    cfg = warm_start_config(cfg)  # init.from_checkpoint: the checkpoint's model and tokenizer
    device_type = resolve_device(cfg.trainer.device).type
    check_tensor_parallel(cfg)
    check_pipeline_run(cfg)
    validate_layout(cfg.parallel, cfg.expert, dist_utils.launched_world_size()
                    if not dist_utils.is_initialized() else dist_utils.world_size(), device_type)
    created = dist_utils.init_from_env(device_type, cfg.trainer.collective_timeout_s)
    try:
        started = time.time()
        trainer = Trainer(cfg, run_dir, task_eval)
        trainer.resume_if_possible()
        if on_start is not None:
            on_start()
        t, total = cfg.trainer, cfg.trainer.stop_at or cfg.trainer.max_steps
        logger = MetricsLogger(run_dir, trainer.cfg, total)
        try:
            logger.say(start_summary(trainer.cfg, run_dir, trainer.device, trainer.precision,
                                     dist_utils.world_size(), trainer.step))
            plan = mixture_plan(trainer.train_data, trainer.cfg)  # how often each source repeats
            if plan:
                logger.say(plan)
            result = trainer.fit(logger)
            if t.final_weights_only and trainer.step >= t.max_steps:
                keep_final_weights_only(run_dir, trainer.model)
            seen = mixture_seen(trainer.train_data)
            if seen:
                logger.say(seen)
            logger.say(end_summary(run_dir, trainer.step, trainer.cfg, time.time() - started,
                                   result))
            return result
        finally:
            logger.close()
    except Exception as err:
        if dist_utils.is_initialized() and dist_utils.is_timeout(err):
            raise TrainingError(
                f"A collective on rank {dist_utils.rank()} waited longer than "
                f"trainer.collective_timeout_s={cfg.trainer.collective_timeout_s}: another rank "
                "died, hangs or runs different code. Check the other ranks' logs; raise the "
                f"timeout only if a step legitimately takes that long. ({err})") from err
        raise
    finally:
        if created:
            dist_utils.shutdown()
