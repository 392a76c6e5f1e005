"""Where numbers go: metrics.jsonl (the contract), the console progress line, and wandb.

Only rank 0 writes. Every row goes to all three sinks with the same keys.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from moe_lm.config import TrainConfig
from moe_lm.model.moe import MoEStats
from moe_lm.training import distributed as dist_utils


class RoutingAccumulator:
    """Sums each MoE layer's routing stats over the micro-steps of one logged step.

    `owner_group` (pipeline parallelism): each rank adds zeros for the layers it does not hold;
    the dropped fractions and entropies are then summed over that group, so rank 0 logs them
    for every layer (the token counts are summed over all ranks anyway)."""

    def __init__(self) -> None:
        self.owner_group = None
        self.reset()

    def reset(self) -> None:
        self.tokens: list[torch.Tensor] = []
        self.dropped: list[torch.Tensor] = []  # device tensors: read at `metrics()`, so adding
        self.entropy: list[torch.Tensor] = []  # a step's stats never waits on the device
        self.n = 0

    def add(self, stats: list[MoEStats]) -> None:
        fresh = not self.tokens
        for i, s in enumerate(stats):
            tokens = s.tokens_per_expert.detach().float()
            dropped = torch.as_tensor(s.dropped_frac).detach().float()
            entropy = s.entropy.detach().float()
            if fresh:
                self.tokens.append(tokens.clone())
                self.dropped.append(dropped.clone())
                self.entropy.append(entropy.clone())
            else:
                self.tokens[i] += tokens
                self.dropped[i] = self.dropped[i] + dropped.to(self.dropped[i].device)
                self.entropy[i] += entropy
        self.n += 1

    def metrics(self) -> dict[str, Any]:
        """The `moe/` keys of the metrics contract, from what was added since the last reset."""
        if not self.tokens:
            return {}
        row: dict[str, Any] = {}
        imbalance, dropped, entropy = [], [], []
        if self.owner_group is not None:
            both = torch.stack([torch.stack(self.dropped), torch.stack(self.entropy)])
            torch.distributed.all_reduce(both, group=self.owner_group)
            self.dropped, self.entropy = list(both[0]), list(both[1])
        for i, tokens_E in enumerate(self.tokens):
            if dist_utils.is_initialized():
                torch.distributed.all_reduce(tokens_E)
            mean = tokens_E.mean().clamp_min(1e-9)
            imb = float(tokens_E.max() / mean)
            cv = float(tokens_E.std(unbiased=False) / mean)
            d, h = float(self.dropped[i]) / self.n, float(self.entropy[i]) / self.n
            row[f"moe/layer{i}/tokens_per_expert"] = [int(t) for t in tokens_E.tolist()]
            row[f"moe/layer{i}/load_imbalance"] = imb
            row[f"moe/layer{i}/load_cv"] = cv
            row[f"moe/layer{i}/dropped_frac"] = d
            row[f"moe/layer{i}/router_entropy"] = h
            imbalance.append(imb), dropped.append(d), entropy.append(h)
        row["moe/load_imbalance"] = sum(imbalance) / len(imbalance)
        row["moe/dropped_frac"] = sum(dropped) / len(dropped)
        row["moe/router_entropy"] = sum(entropy) / len(entropy)
        return row


def score_bias_metrics(biases: list[torch.Tensor]) -> dict[str, Any]:
    """aux_free balancing: each MoE layer's per-expert selection bias and their largest |value|."""
    if not biases:
        return {}
    row: dict[str, Any] = {f"moe/layer{i}/score_bias": [float(b) for b in bias_E]
                           for i, bias_E in enumerate(biases)}
    row["moe/score_bias_absmax"] = max(float(b.abs().max()) for b in biases)
    return row


class MetricsLogger:
    """Writes rows to `<run>/metrics.jsonl` (appending on resume), the console and wandb."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, total_steps: int):
        self.enabled = dist_utils.is_rank0()
        self.total_steps = total_steps
        self.start_time = time.time()
        self.start_step: int | None = None
        self.wandb_run = None
        if not self.enabled:
            return
        self.file = open(Path(run_dir) / "metrics.jsonl", "a")
        self.text_log = open(Path(run_dir) / "train.log", "a")  # beside Hydra's own lines
        if cfg.logger.wandb.mode != "disabled":
            self.wandb_run = _init_wandb(run_dir, cfg)

    def log(self, row: dict[str, Any]) -> None:
        """Writes one row (it must hold `step`)."""
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: _wandb_value(v) for k, v in row.items() if k != "step"},
                               step=row["step"])

    def say(self, text: str) -> None:
        """Prints `text` (rank 0) and appends it, time-stamped, to `<run>/train.log`."""
        if not self.enabled:
            return
        print(text, flush=True)
        stamp = time.strftime("[%Y-%m-%d %H:%M:%S]")
        self.text_log.write("".join(f"{stamp} {line}\n" for line in text.splitlines()))
        self.text_log.flush()

    def console(self, row: dict[str, Any]) -> None:
        """The console (and train.log) line of a training or evaluation row."""
        if not self.enabled:
            return
        step = row["step"]
        if "val_loss" in row:
            tasks = "".join(f" | {k[len('eval/'):]} {v:.4f}" for k, v in row.items()
                            if k.startswith("eval/"))  # trainer.eval_tasks metrics
            self.say(f"step {step:>6} | val_loss {row['val_loss']:.4f} | val_ppl {row['val_ppl']:.1f}"
                     f"{tasks}")
            return
        if self.start_step is None:
            self.start_step, self.start_time = step - 1, time.time() - row.get("step_time", 0.0)
        per_step = (time.time() - self.start_time) / max(1, step - self.start_step)
        eta = per_step * (self.total_steps - step)
        aux = f" | aux {row['aux_loss']:.3f}" if "aux_loss" in row else ""
        moe = f" | imb {row['moe/load_imbalance']:.2f}" if "moe/load_imbalance" in row else ""
        self.say(f"step {step:>6}/{self.total_steps} | loss {row['loss']:.4f} | lm {row['lm_loss']:.4f}"
                 f"{aux}{moe} | gnorm {row['grad_norm']:.2f} | lr {row['lr']:.2e} | "
                 f"{row['tokens_per_s']:,.0f} tok/s | ETA {_fmt_time(eta)}")

    def log_image(self, key: str, path: Path, step: int) -> None:
        """Sends a PNG written to the run directory to wandb as an image at `step`."""
        if not self.enabled or self.wandb_run is None:
            return
        import wandb

        self.wandb_run.log({key: wandb.Image(str(path))}, step=step)

    def alert(self, title: str, text: str) -> None:
        """A warning that needs a human: console and a wandb alert."""
        if not self.enabled:
            return
        self.say(f"WARNING: {title}: {text}")
        if self.wandb_run is not None:
            try:
                self.wandb_run.alert(title=title, text=text)
            except Exception:  # alerts need a server; offline runs keep the console line
                pass

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        self.text_log.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _wandb_value(v: Any) -> Any:
    if isinstance(v, list):  # per-expert counts: a histogram-friendly table of one row
        import wandb

        return wandb.Histogram(np_histogram=(v, list(range(len(v) + 1))))
    return v


def _init_wandb(run_dir: Path, cfg: TrainConfig):
    import wandb

    w = cfg.logger.wandb
    id_file = Path(run_dir) / "wandb_run_id"  # a resumed run continues the same wandb run
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(project=w.project, entity=w.entity, group=w.group, name=w.name,
                      tags=list(w.tags), mode=w.mode, dir=str(run_dir), id=run_id,
                      resume="allow", config=asdict(cfg),
                      settings=wandb.Settings(silent=True, console="off"))


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
