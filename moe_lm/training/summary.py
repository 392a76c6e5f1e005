"""What a run says about itself at its start and end: where it writes, what it trains, how it went.

The start summary names the run directory, the parameter counts (total, active per token and the
embedding's share), device, precision, tokens per step and the schedule; the end summary gives
the wall time, the best and final validation loss (from `metrics.jsonl`, so a resumed run counts
its earlier evaluations too) and the newest checkpoint. A run on a data mixture also says, at its
start, how many epochs of each source its steps will read, and at its end how many it read (a
source smaller than its share of the run repeats). Rank 0 prints them through
`MetricsLogger.say`, which also writes them to `<run>/train.log`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from moe_lm.config import TrainConfig
from moe_lm.data.mixture import MixtureLoader, planned_epochs
from moe_lm.model import count_params
from moe_lm.parallel.precision import Precision
from moe_lm.training.checkpoint import list_checkpoints


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def fmt_duration(seconds: float) -> str:
    """`1h02m`, `12m34s` or `5.2s`."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def precision_text(precision: Precision) -> str:
    """`bf16 autocast (fp32 weights)` or `fp32`."""
    dtype = precision.autocast_dtype
    short = {torch.bfloat16: "bf16", torch.float16: "fp16"}
    return "fp32" if dtype is None else f"{short.get(dtype, str(dtype))} autocast (fp32 weights)"


def start_summary(cfg: TrainConfig, run_dir: Path, device: torch.device, precision: Precision,
                  world_size: int, step: int) -> str:
    """The lines a run prints before its first step (`cfg.model.vocab_size` already resolved)."""
    m, e, t, d = cfg.model, cfg.expert, cfg.trainer, cfg.data
    counts = count_params(m, e)
    embed = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    end = t.stop_at or t.max_steps
    step_tokens = t.grad_accum * d.batch_size * d.seq_len * world_size
    threads = (f" ({cpu_kind()}, {torch.get_num_threads()} threads)" if device.type == "cpu"
               else f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    start = f"resuming at step {step}" if step else "from step 0"
    return "\n".join([
        f"run dir: {Path(run_dir).resolve()}  (metrics.jsonl, train.log, checkpoints/, .hydra/)",
        f"model: {_millions(counts['total'])} parameters, {_millions(counts['active'])} active per "
        f"token; embedding {_millions(embed)} = {100 * embed / counts['total']:.0f}% of total | "
        f"{m.n_layers} layers{_sharing(m.n_layers, m.share_layers)}, d_model {m.d_model}, "
        f"{e.num_experts} experts top-{e.top_k}",
        f"device: {device.type}{threads} x {world_size} process(es) | precision "
        f"{precision_text(precision)}",
        f"data: {step_tokens:,} tokens/step ({d.batch_size} seqs x {d.seq_len} tokens x "
        f"{t.grad_accum} accum x {world_size} rank(s)) | steps {end} of schedule {t.max_steps}, "
        f"{start} | eval every {t.eval_every}, checkpoint every {t.ckpt_every}",
        *filter(None, [already_complete(step, end, t.max_steps)]),
    ])


def _sharing(n_layers: int, share_layers: int) -> str:
    """' (2 distinct blocks, each applied 2 times)' under model.share_layers, else ''."""
    if share_layers == 1:
        return ""
    return f" ({n_layers // share_layers} distinct blocks, each applied {share_layers} times)"


def val_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, val_loss) of every evaluation in `<run>/metrics.jsonl`, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def end_summary(run_dir: Path, step: int, cfg: TrainConfig, wall_s: float,
                result: dict[str, Any]) -> str:
    """The lines a run prints when it ends (completed, stopped at `stop_at`, or SIGTERM)."""
    t = cfg.trainer
    end = t.stop_at or t.max_steps
    evals = val_losses(run_dir)
    if step >= t.max_steps:
        head = f"done: {step}/{t.max_steps} steps"
    else:
        head = (f"stopped at step {step} of {t.max_steps} (start the same command with "
                f"hydra.run.dir={run_dir} to continue)" if step < end else
                f"stopped at trainer.stop_at={step} of {t.max_steps} (rerun in the same directory "
                "without stop_at to continue)")
    parts = [f"{head} in {fmt_duration(wall_s)}"]
    if evals:
        best_step, best = min(evals, key=lambda sv: sv[1])
        final = result.get("val_loss", evals[-1][1])
        parts.append(f"val_loss best {best:.4f} (step {best_step}), final {final:.4f}")
    ckpts = list_checkpoints(run_dir, warn=False)
    if ckpts:
        size = _dir_bytes(ckpts[0].path)
        parts.append(f"checkpoint {ckpts[0].path} ({size / 1e6:,.0f} MB)")
    return " | ".join(parts) + f"\nrun dir: {Path(run_dir).resolve()}"


def _epochs(epochs: float) -> str:
    return f"{epochs:.3g} epochs" + (", repeats" if epochs > 1 else "")


def mixture_plan(loader: object, cfg: TrainConfig) -> str | None:
    """The start line of a run on a data mixture: each source's share and the epochs of it the
    whole run (`trainer.max_steps` x `trainer.grad_accum` global batches) reads; None otherwise."""
    if not isinstance(loader, MixtureLoader):
        return None
    epochs = planned_epochs(loader, cfg.trainer.max_steps * cfg.trainer.grad_accum)
    return f"mixture over {cfg.trainer.max_steps} steps: " + ", ".join(
        f"{n} {100 * share:.3g}% ({src.n_windows:,} sequences, {_epochs(epochs[n])})"
        for n, share, src in zip(loader.names, loader.shares, loader.sources))


def mixture_seen(loader: object) -> str | None:
    """The end line of a run on a data mixture: the epochs of each source it has read."""
    if not isinstance(loader, MixtureLoader):
        return None
    return "data seen: " + ", ".join(f"{n} {e:.3g} epochs" + (" (repeated)" if e > 1 else "")
                                     for n, e in loader.epochs().items())


def already_complete(step: int, end: int, max_steps: int) -> str | None:
    """What a rerun of a run that already reached its last step says (None when there is work)."""
    if step < end:
        return None
    more = (f"raise trainer.max_steps above {max_steps} to train further, "
            if end >= max_steps else f"raise trainer.stop_at above {end} to go on, ")
    return (f"this run is already complete at step {step} of {end}: nothing to train ({more}"
            "or choose a new hydra.run.dir for a new run).")


def cpu_kind() -> str:
    """This machine's CPU model and core count (what CPU timings depend on)."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name or 'unknown CPU'}, {os.cpu_count()} cores"
