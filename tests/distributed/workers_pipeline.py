"""What the spawned ranks of the pipeline tests run: torch's schedules against one process."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from moe_lm.config import ParallelConfig
from moe_lm.model import Transformer
from moe_lm.parallel import clip_grad_norm_, init_on_device
from moe_lm.parallel.pipeline import build_schedule, build_stage_modules, pipeline_step
from moe_lm.training import distributed as dist_utils
from moe_lm.training.step import forward_backward
from tests.distributed.workers import tiny_config

SEED, STEPS, BATCH, SEQ, CLIP = 7, 3, 8, 16, 0.05  # a small clip: clipping acts on every step


def _cfg():
    cfg = tiny_config(ParallelConfig())
    return replace(cfg, model=replace(cfg.model, n_layers=4, tie_embeddings=False))


def _batches(vocab: int, seq: int = SEQ):
    gen = torch.Generator().manual_seed(SEED)
    return [torch.randint(0, vocab, (BATCH, seq + 1), generator=gen) for _ in range(STEPS)]


def reference(microbatches: int) -> dict:
    """One process: each step's microbatches as gradient accumulation, clip, AdamW."""
    cfg = _cfg()
    model = init_on_device(Transformer(cfg.model, cfg.expert, cfg.loss), "cpu", SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rows = []
    for batch in _batches(cfg.model.vocab_size):
        logs = []
        for mb in batch.chunk(microbatches):
            logs.append(forward_backward(model, mb, None, "cpu", grad_divisor=microbatches).logs)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        norm = clip_grad_norm_(model.parameters(), CLIP)
        opt.step(), opt.zero_grad()
        rows.append({"logs": [{k: float(v) for k, v in l.items()} for l in logs], "loss": sum(float(l["loss"]) for l in logs) / microbatches,
                     "aux_loss": sum(float(l["aux_loss"]) for l in logs) / microbatches,
                     "grad_norm": float(norm), "grads": grads})
    return rows


def pipeline_rank(rank: int, schedule: str, microbatches: int, layers) -> dict:
    """pp = world size; per step: the losses (last stage), the global grad norm, and the largest
    difference of this rank's gradients from the single-process ones, by parameter name."""
    dist_utils.init_from_env("cpu", timeout_s=60)
    pp = dist.get_world_size()
    want = reference(microbatches)
    cfg = _cfg()
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.expert, cfg.loss)
    ids, modules = build_stage_modules(model, rank, pp, schedule, layers)
    for m in modules:
        init_on_device(m, "cpu", SEED)
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2)
    pipe = build_schedule(modules, ids, pp, schedule, microbatches,
                          (BATCH // microbatches, SEQ + 1), torch.device("cpu"), None)
    report = {"stages": ids, "steps": []}
    for step, batch in enumerate(_batches(cfg.model.vocab_size)):
        out = pipeline_step(pipe, modules, batch)
        diff = max((p.grad - want[step]["grads"][n]).abs().max().item()
                   for m in modules for n, p in m.named_parameters())
        routers = [n for m in modules for n, _ in m.named_parameters() if "router" in n]
        norm = clip_grad_norm_(params, CLIP, pp_group=dist.group.WORLD)
        opt.step(), opt.zero_grad()
        row = {"grad_norm": float(norm), "want_grad_norm": want[step]["grad_norm"],
               "max_grad_diff": diff, "routers": routers}
        if out is not None:
            row.update(out=out.tolist(), loss=float(out[0]), want_loss=want[step]["loss"],
                       aux_loss=float(out[2]), want_aux=want[step]["aux_loss"], want_logs=want[step]["logs"])
        report["steps"].append(row)
    return report
