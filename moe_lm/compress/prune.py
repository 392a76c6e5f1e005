"""Expert pruning: each MoE layer keeps its K most used experts.

Legend: E experts before, K kept, D model width, F expert hidden size.

Usage is measured on the run's validation batches: how many tokens the router sends to each
expert of each MoE layer. Each layer keeps its K most used experts (in their original order, so
K = E changes nothing), and the router keeps the matching rows of its gate, so every token now
picks its top-k among the survivors (top-k becomes min(top_k, K)). The smaller model is written
as a new run directory (`.hydra/config.yaml` with `expert.num_experts=K` and a
`checkpoints/step_N/` in the usual format) that eval, generate, quantize and export_hf load like
any other; the validation perplexity before and after says what pruning cost.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

import torch
from omegaconf import OmegaConf

from moe_lm.config import TrainConfig
from moe_lm.errors import ConfigError
from moe_lm.inference.evaluate import evaluate_batches, val_split_batches
from moe_lm.inference.loading import LoadedModel
from moe_lm.inference.progress import progress
from moe_lm.inference.text import token_byte_lengths
from moe_lm.model import MoE, Transformer
from moe_lm.training.checkpoint import save_checkpoint
from moe_lm.parallel.precision import Precision
from moe_lm.training.optim import build_optimizer


@torch.no_grad()
def expert_usage(model: Transformer, batches: Iterable[torch.Tensor],
                 precision: str = "fp32", total: int | None = None) -> list[torch.Tensor]:
    """Tokens routed to each expert, per MoE block: a list of (E,) counts (eval mode, dropless).
    A block shared by `model.share_layers` applied layers sums the tokens of all of them (its
    experts are one set of weights, kept or cut together)."""
    model.eval()
    device = next(model.parameters()).device
    usage: list[torch.Tensor] = []
    for batch in progress(batches, "expert usage", total):
        batch = batch.to(device)
        with Precision.resolve(precision, device.type).autocast(device.type):
            out = model(batch[:, :-1], batch[:, 1:], return_logits=False)
        counts = [s.tokens_per_expert.detach().float().cpu() for s in out.moe_stats]
        usage = counts if not usage else [u + c for u, c in zip(usage, counts)]
    applied = [b for b in model.applied_layers() if b.is_moe]  # the block of each usage row
    return [sum(u for u, b in zip(usage, applied) if b is block)
            for block in model.layers if block.is_moe]


def kept_experts(usage_E: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` most used experts, ascending (ties go to the lower index)."""
    order = sorted(range(len(usage_E)), key=lambda e: (-float(usage_E[e]), e))
    return torch.tensor(sorted(order[:keep]), dtype=torch.long)


@torch.no_grad()
def prune_model(model: Transformer, cfg: TrainConfig, usage: list[torch.Tensor],
                keep: int) -> tuple[Transformer, TrainConfig, list[torch.Tensor]]:
    """A new model with each MoE layer cut to its `keep` most used experts; returns it, its
    config and the kept expert indices of every MoE layer."""
    E = cfg.expert.num_experts
    if not 1 <= keep <= E:
        raise ConfigError(f"--keep {keep}: choose between 1 and the model's {E} experts.")
    expert_cfg = replace(cfg.expert, num_experts=keep, top_k=min(cfg.expert.top_k, keep))
    new_cfg = replace(cfg, expert=expert_cfg)
    new_model = Transformer(new_cfg.model, new_cfg.expert, new_cfg.loss)
    state = model.state_dict()
    moe_names = [name for name, m in model.named_modules() if isinstance(m, MoE)]
    kept = [kept_experts(u, keep) for u in usage]
    for name, idx_K in zip(moe_names, kept):
        for key in ("router.gate.weight", "router.score_bias", "experts.w1_EDF", "experts.w3_EDF",
                    "experts.w2_EFD"):
            full = f"{name}.{key}"
            state[full] = state[full].index_select(0, idx_K.to(state[full].device))
    new_model.load_state_dict(state)
    return new_model.to(next(model.parameters()).device).eval(), new_cfg, kept


def save_pruned(loaded: LoadedModel, model: Transformer, cfg: TrainConfig, out_dir: Path) -> Path:
    """Writes `out_dir` as a run directory holding the pruned model's checkpoint and config."""
    out_dir = Path(out_dir)
    if (out_dir / "checkpoints").exists():
        raise ConfigError(f"{out_dir} already holds checkpoints; choose a new --out directory.")
    hydra_dir = out_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    source_cfg = loaded.run_dir / ".hydra" / "config.yaml" if loaded.run_dir else None
    run_cfg = (OmegaConf.load(source_cfg) if source_cfg and source_cfg.is_file()
               else OmegaConf.structured(loaded.cfg))
    run_cfg.expert.num_experts = cfg.expert.num_experts
    run_cfg.expert.top_k = cfg.expert.top_k
    OmegaConf.save(run_cfg, hydra_dir / "config.yaml")
    identity = {**loaded.ckpt.meta["identity"], "num_experts": cfg.expert.num_experts}
    state_file = loaded.ckpt.path / "trainer_state.pt"
    trainer_state = (torch.load(state_file, weights_only=False) if state_file.is_file()
                     else {"step": loaded.ckpt.step})
    optimizer = build_optimizer(model, cfg.optim)  # fresh: the format holds optimizer state
    return save_checkpoint(out_dir, loaded.ckpt.step, model, optimizer, trainer_state, identity,
                           keep_last=1)


def check_keep(loaded: LoadedModel, keep: int) -> None:
    """Raises ConfigError unless 1 <= keep <= the model's expert count."""
    E = loaded.cfg.expert.num_experts
    if not 1 <= keep <= E:
        raise ConfigError(f"--keep {keep}: choose between 1 and the model's {E} experts.")


def default_out_dir(loaded: LoadedModel, keep: int) -> Path:
    """`<run>_keepK` beside the run (or beside the checkpoint when it has no run directory)."""
    base = loaded.run_dir or loaded.ckpt.path
    return base.parent / f"{base.name}_keep{keep}"


def prune_run(loaded: LoadedModel, keep: int, out_dir: Path,
              batches: int | None = None) -> dict[str, Any]:
    """Measures usage, prunes, saves to `out_dir`; returns what `python -m moe_lm.prune` reports."""
    E = loaded.cfg.expert.num_experts
    lengths = token_byte_lengths(loaded.tokenizer, loaded.cfg.model.vocab_size)
    n = batches or loaded.cfg.trainer.eval_batches
    usage = expert_usage(loaded.model, val_split_batches(loaded, batches), total=n)
    before = evaluate_batches(loaded.model, val_split_batches(loaded, batches), lengths,
                              desc="before pruning", total=n)
    model, cfg, kept = prune_model(loaded.model, loaded.cfg, usage, keep)
    after = evaluate_batches(model, val_split_batches(loaded, batches), lengths,
                             desc="after pruning", total=n)
    ckpt = save_pruned(loaded, model, cfg, out_dir)
    kept_share = [float(u[k].sum() / u.sum().clamp_min(1)) for u, k in zip(usage, kept)]
    return {"out": str(ckpt), "experts": E, "keep": keep, "top_k": cfg.expert.top_k,
            "kept_experts": [k.tolist() for k in kept], "kept_usage_share": kept_share,
            "params_before": sum(p.numel() for p in loaded.model.parameters()),
            "params_after": sum(p.numel() for p in model.parameters()),
            "loss_before": before.loss, "loss_after": after.loss,
            "ppl_before": before.ppl, "ppl_after": after.ppl}


def format_row(row: dict[str, Any]) -> str:
    """The human-readable summary of a `prune_run` row."""
    lines = [f"pruned {row['experts']} -> {row['keep']} experts per MoE layer (top_k "
             f"{row['top_k']}); saved {row['out']}"]
    for i, (k, share) in enumerate(zip(row["kept_experts"], row["kept_usage_share"])):
        lines.append(f"  MoE layer {i}: kept experts {k} ({share:.1%} of routed tokens)")
    b, a = row["loss_before"], row["loss_after"]
    lines += [f"parameters   {row['params_before']:,} -> {row['params_after']:,}",
              f"val loss     {b:.4f} -> {a:.4f} ({a - b:+.4f}), computed in fp32 (eval uses "
              "the run's trainer.precision; --precision fp32 there matches)",
              f"perplexity   {row['ppl_before']:.3f} -> {row['ppl_after']:.3f} "
              f"({row['ppl_after'] / row['ppl_before'] - 1:+.2%})"]
    return "\n".join(lines)
