"""What the spawned ranks of the distributed tests run (importable, so spawn can find it)."""

from __future__ import annotations

import os
import signal
import time

import torch

from moe_lm.config import ExpertConfig, ModelConfig, ParallelConfig, TrainConfig, TrainerConfig
from moe_lm.model import Transformer
from moe_lm.parallel import build_mesh, init_on_device, parallelize
from moe_lm.training import distributed as dist_utils
from moe_lm.model.terms import LossTerm
from moe_lm.training import loop, pipeline_step
from tests.training.helpers import train_in_process


def _sabotage_pipeline(mode: str, at_step: int) -> None:
    """Under parallel.pp: rank 1 (the last stage) misbehaves in its `at_step`-th step."""
    original, calls = pipeline_step.PipelineRunner.train_step, [0]

    def train_step(self, batches):
        calls[0] += 1
        if calls[0] != at_step:
            return original(self, batches)
        if mode == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            return original(self, batches)
        # a NaN in the last stage's loss: its backward poisons the gradients of every stage
        hook = self.stages[-1].register_forward_hook(lambda m, i, out: out * float("nan"))
        try:
            return original(self, batches)
        finally:
            hook.remove()

    pipeline_step.PipelineRunner.train_step = train_step


def _sabotage(rank: int, mode: str, at_step: int, seconds: float) -> None:
    """Makes rank 1 misbehave at its `at_step`-th training micro-step (grad_accum=1); modes
    `pipeline_nan` and `pipeline_sigterm` at its `at_step`-th pipeline step."""
    if rank != 1 or mode == "none":
        return
    if mode.startswith("pipeline_"):
        return _sabotage_pipeline(mode.removeprefix("pipeline_"), at_step)
    original, calls = loop.forward_backward, [0]

    def forward_backward(model, batch, precision, device_type, extra=None, **kwargs):
        calls[0] += 1
        if calls[0] != at_step:
            return original(model, batch, precision, device_type, extra, **kwargs)
        if mode == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        elif mode == "stall":
            time.sleep(seconds)
        if mode != "nan":
            return original(model, batch, precision, device_type, extra, **kwargs)

        def poisoned(model, batch, out):  # a NaN loss term makes the total NaN
            terms = extra(model, batch, out) if extra is not None else {}
            return {**terms, "poison": LossTerm(out.lm_loss * float("nan"))}

        return original(model, batch, precision, device_type, poisoned, **kwargs)

    loop.forward_backward = forward_backward


def train_rank(rank: int, run_dir: str, overrides: list[str], mode: str = "none",
               at_step: int = 0, seconds: float = 0.0) -> float | None:
    """One rank of a training run through the real entry path (joins the group from env://)."""
    _sabotage(rank, mode, at_step, seconds)
    return train_in_process(run_dir, overrides).get("val_loss")


def tiny_config(parallel: ParallelConfig) -> TrainConfig:
    model = ModelConfig(n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                        vocab_size=300, n_dense_layers=1)
    return TrainConfig(model=model, expert=ExpertConfig(num_experts=4, hidden_size=24),
                       parallel=parallel, trainer=TrainerConfig(seed=7))


def init_rank(rank: int, layouts: list[tuple[int, ...]]) -> dict:
    """Per layout: the largest difference between the gathered per-rank init and the
    single-process init, and the largest share of any full tensor one rank allocated."""
    dist_utils.init_from_env("cpu", timeout_s=60)
    reference = init_on_device(
        Transformer(*_parts(tiny_config(ParallelConfig()))), "cpu", seed=7).state_dict()
    report = {}
    for layout in layouts:  # (dp_replicate, dp_shard, ep[, tp])
        r, s, e, t = (*layout, 1)[:4]
        cfg = tiny_config(ParallelConfig(dp_replicate=r, dp_shard=s, ep=e, tp=t))
        mesh = build_mesh(cfg.parallel, "cpu", cfg.expert)
        with torch.device("meta"):
            model = Transformer(*_parts(cfg))
        parallelize(model, mesh, cfg)
        init_on_device(model, "cpu", seed=7)
        diff, share = 0.0, 0.0
        for name, p in model.named_parameters():
            share = max(share, p.to_local().numel() / p.numel())
            diff = max(diff, (p.full_tensor() - reference[name]).abs().max().item())
        report["x".join(map(str, layout))] = {"max_diff": diff, "max_share": share}
    return report


def _parts(cfg: TrainConfig):
    return cfg.model, cfg.expert, cfg.loss
