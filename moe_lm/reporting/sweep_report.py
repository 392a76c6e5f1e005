"""The sweep report: one table and one plot for a whole Hydra multirun directory.

Reads every job of a Hydra multirun directory (its `status.json`, `metrics.jsonl` and overrides)
and writes into that directory

- `report.md`: a markdown table, one row per job: the overrides that vary across the sweep, its
  status, steps, final validation loss, training tokens/s (median over logged steps), and the
  load imbalance and dropped fraction of its last logged step, then one column per source of a
  data mixture (`val/<name>/loss`, when any job has them) and per lm-eval task metric; also
  printed to stdout;
- `report.png`: validation loss against step, one line per job.

Jobs that failed, were killed or never started are listed as such: a job's status comes from its
`status.json` (see `moe_lm.launch.job_status`), and the jobs the sweep should have run come from
the sweep's `multirun.yaml` (for Hydra's basic sweeper), so a job without a directory is `missing`.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from moe_lm.errors import MoeLMError
from moe_lm.launch.job_status import read_status

REPORT_MD, REPORT_PNG = "report.md", "report.png"
SKIP_DIRS = {".hydra", ".submitit", "checkpoints", "wandb", "plots"}
NAMING_KEYS = ("logger.wandb.group", "logger.wandb.name")  # name a job, do not configure it
STATUS_TEXT = {"running": "running or killed", "unknown": "no status.json"}


@dataclass
class JobReport:
    """What the report shows for one job of the sweep."""

    num: Optional[int]
    path: Optional[Path]
    status: str  # completed | stopped | failed | running | missing | unknown
    overrides: list[str] = field(default_factory=list)
    step: Optional[int] = None
    val_loss: Optional[float] = None
    tokens_per_s: Optional[float] = None
    load_imbalance: Optional[float] = None
    dropped_frac: Optional[float] = None
    error: Optional[str] = None
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    task_metrics: dict[str, float] = field(default_factory=dict)  # "<task>/<metric>": last value
    source_losses: dict[str, float] = field(default_factory=dict)  # data.sources: name -> last


def expected_jobs(sweep_dir: Path) -> Optional[list[list[str]]]:
    """Each job's overrides as Hydra's basic sweeper expands them from `multirun.yaml`.

    None when the sweep used another sweeper (e.g. an optimiser that picks jobs as it goes) or
    has no readable `multirun.yaml`.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    try:
        hydra_cfg = OmegaConf.load(path).hydra
        if not str(hydra_cfg.sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return None
        params = hydra_cfg.sweeper.get("params") or {}
        arguments = [f"{k}={v}" for k, v in params.items()] + list(hydra_cfg.overrides.task)
        parsed = OverridesParser.create().parse_overrides(arguments)
        batches = BasicSweeper.split_arguments(parsed, hydra_cfg.sweeper.get("max_batch_size"))
    except Exception:  # a multirun.yaml this Hydra cannot read: fall back to the job dirs alone
        return None
    return [list(job) for batch in batches for job in batch]


def find_job_dirs(sweep_dir: Path, max_depth: int = 3) -> list[Path]:
    """Directories under the sweep that hold a run (a `status.json` or `metrics.jsonl`)."""
    found, frontier = [], [sweep_dir]
    for _ in range(max_depth):
        next_frontier = []
        for d in frontier:
            for child in sorted(p for p in d.iterdir() if p.is_dir() and p.name not in SKIP_DIRS):
                if (child / "status.json").is_file() or (child / "metrics.jsonl").is_file():
                    found.append(child)
                else:
                    next_frontier.append(child)
        frontier = next_frontier
    return found


def read_job(job_dir: Path) -> JobReport:
    """One job's report row from its run directory."""
    status = read_status(job_dir) or {}
    overrides = status.get("overrides")
    if overrides is None:
        overrides = _read_overrides_yaml(job_dir)
    num = status.get("job_num")
    if num is None and job_dir.name.isdigit():
        num = int(job_dir.name)
    job = JobReport(num=num, path=job_dir, status=status.get("status", "unknown"),
                    overrides=[o for o in overrides if _override_key(o) not in NAMING_KEYS],
                    error=status.get("error"))
    rows = _read_metrics(job_dir / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    curve: dict[int, float] = {int(r["step"]): float(r["val_loss"]) for r in evals}  # resume: last
    job.val_curve = sorted(curve.items())
    if job.val_curve:
        job.val_loss = job.val_curve[-1][1]
    for r in evals:  # trainer.eval_tasks: eval/<task>/<metric>, the last logged value of each
        job.task_metrics.update({k[len("eval/"):]: float(v) for k, v in r.items()
                                 if k.startswith("eval/")})
        job.source_losses.update({k.split("/")[1]: float(v) for k, v in r.items()
                                  if k.startswith("val/") and k.endswith("/loss")})
    if rows:
        job.step = max(int(r["step"]) for r in rows)
    rates = [float(r["tokens_per_s"]) for r in train if "tokens_per_s" in r]
    job.tokens_per_s = statistics.median(rates) if rates else None
    if train:
        job.load_imbalance = train[-1].get("moe/load_imbalance")
        job.dropped_frac = train[-1].get("moe/dropped_frac")
    return job


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a killed job
            continue
    return [r for r in rows if isinstance(r, dict) and "step" in r]


def _read_overrides_yaml(job_dir: Path) -> list[str]:
    from omegaconf import OmegaConf

    path = job_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def collect_jobs(sweep_dir: Path) -> list[JobReport]:
    """Every job of the sweep, in job order, with jobs it should have run but did not as `missing`."""
    jobs = [read_job(d) for d in find_job_dirs(sweep_dir)]
    expected = expected_jobs(sweep_dir)
    if expected is not None:
        seen = {j.num for j in jobs}
        jobs += [JobReport(num=i, path=None, status="missing", overrides=list(o))
                 for i, o in enumerate(expected) if i not in seen]
    return sorted(jobs, key=lambda j: (j.num is None, j.num if j.num is not None else 0,
                                       str(j.path)))


def split_overrides(jobs: list[JobReport]) -> tuple[list[str], list[str]]:
    """(overrides every job shares, each job's label made of the overrides that vary)."""
    if not jobs:
        return [], []
    common = [o for o in jobs[0].overrides if all(o in j.overrides for j in jobs[1:])]
    labels = [" ".join(o for o in j.overrides if o not in common) or "(defaults)" for j in jobs]
    return common, labels


def markdown(sweep_dir: Path, jobs: list[JobReport]) -> str:
    """The report's markdown: a header, the table, the best job and any failures."""
    common, labels = split_overrides(jobs)
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j.status] = counts.get(j.status, 0) + 1
    lines = [f"# Sweep report: `{sweep_dir}`", "",
             f"{len(jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ".",
             ""]
    if common:
        lines += ["Shared overrides: " + " ".join(f"`{o}`" for o in common), ""]
    tasks = sorted({k for j in jobs for k in j.task_metrics})  # one column per task metric
    sources = _source_names(jobs)  # one column per source of a data mixture
    lines += ["| job | overrides | status | steps | final val loss | tokens/s | load imbalance "
              "| dropped frac |" + "".join(f" val/{n}/loss |" for n in sources)
              + "".join(f" {t} |" for t in tasks),
              "|---:|---|---|---:|---:|---:|---:|---:|" + "---:|" * (len(sources) + len(tasks))]
    for job, label in zip(jobs, labels):
        lines.append(f"| {'?' if job.num is None else job.num} | `{label}` | "
                     f"{STATUS_TEXT.get(job.status, job.status)} | {_fmt(job.step, '{:d}')} | "
                     f"{_fmt(job.val_loss, '{:.4f}')} | {_fmt(job.tokens_per_s, '{:,.0f}')} | "
                     f"{_fmt(job.load_imbalance, '{:.3f}')} | {_fmt(job.dropped_frac, '{:.4f}')} |"
                     + "".join(f" {_fmt(job.source_losses.get(n), '{:.4f}')} |" for n in sources)
                     + "".join(f" {_fmt(job.task_metrics.get(t), '{:.4f}')} |" for t in tasks))
    done = [(j, lab) for j, lab in zip(jobs, labels) if j.status == "completed"
            and j.val_loss is not None and math.isfinite(j.val_loss)]
    if done:
        best, label = min(done, key=lambda pair: pair[0].val_loss)
        lines += ["", f"Lowest final validation loss: job {best.num} (`{label}`), "
                      f"{best.val_loss:.4f}."]
    problems = [(j, lab) for j, lab in zip(jobs, labels) if j.status != "completed"]
    if problems:
        lines += ["", "Jobs that did not complete:", ""]
        for j, label in problems:
            why = j.error or {"missing": "no job directory: it never started",
                              "running": "still running, or killed without a word (e.g. out of "
                                         "memory)",
                              "stopped": "stopped early (SIGTERM); rerun the sweep to resume it",
                              "unknown": "no status.json: started by an older moe_lm or "
                                         "killed before writing it"}.get(j.status, j.status)
            lines.append(f"- job {j.num} (`{label}`): {why}")
    lines += ["", "Columns: final val loss = the last `val_loss` row; tokens/s = median over "
                  "logged training steps; load imbalance (max tokens per expert / mean, averaged "
                  "over MoE layers) and dropped frac = the last logged training step"
                  + ("; `val/<name>/loss` = the last validation loss on that source of the "
                     "data mixture alone (data.sources; the final val loss is their mean under "
                     "the mixture's weights)" if sources else "")
                  + ("; `<task>/<metric>` = the last value of lm-eval's metric "
                     "(trainer.eval_tasks)." if tasks else "."), ""]
    return "\n".join(lines)


def _source_names(jobs: list[JobReport]) -> list[str]:
    """The mixture sources of all jobs, in the order they first appear (the config's order)."""
    names: list[str] = []
    for job in jobs:
        names += [n for n in job.source_losses if n not in names]
    return names


def _fmt(value: Optional[float], spec: str) -> str:
    if value is None:
        return "-"
    return spec.format(value)


def plot(jobs: list[JobReport], path: Path, title: str) -> None:
    """Validation loss against step, one line per job (dashed: jobs that did not complete).

    Left: the losses. Right: each job's loss minus the mean over jobs at that step, which shows
    differences that are small next to the fall of the loss itself.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, labels = split_overrides(jobs)
    curves = [(j, lab) for j, lab in zip(jobs, labels) if j.val_curve]
    by_step: dict[int, list[float]] = {}
    for job, _ in curves:
        for step, loss in job.val_curve:
            by_step.setdefault(step, []).append(loss)
    mean = {s: sum(v) / len(v) for s, v in by_step.items() if len(v) >= 2}
    fig, (ax, ax_rel) = plt.subplots(1, 2, figsize=(12, 5))
    for job, label in curves:
        steps, losses = zip(*job.val_curve)
        style = "-" if job.status == "completed" else "--"
        suffix = "" if job.status == "completed" else f" [{job.status}]"
        ax.plot(steps, losses, style, marker="o", markersize=3, label=f"{job.num}: {label}{suffix}")
        rel = [(s, v - mean[s]) for s, v in job.val_curve if s in mean]
        if rel:
            ax_rel.plot(*zip(*rel), style, marker="o", markersize=3)
    if curves:
        ax.legend(fontsize=7, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no validation rows yet", ha="center", va="center",
                transform=ax.transAxes)
    ax.set(xlabel="step", ylabel="validation loss", title=title)
    ax_rel.set(xlabel="step", ylabel="validation loss - mean over jobs",
               title="difference to the sweep mean at each step")
    ax_rel.axhline(0.0, color="gray", linewidth=0.8)
    for a in (ax, ax_rel):
        a.title.set_fontsize(9)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(sweep_dir: Path | str) -> tuple[str, list[JobReport]]:
    """Writes `report.md` and `report.png` into the sweep directory; returns the markdown and rows.

    Raises MoeLMError when the directory does not exist or holds no jobs.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise MoeLMError(f"{sweep_dir} is not a directory: pass the sweep's directory, e.g. "
                         "multirun/2025-01-31/12-00-00 (hydra.sweep.dir of the sweep).")
    jobs = collect_jobs(sweep_dir)
    if not jobs:
        raise MoeLMError(f"{sweep_dir} holds no sweep jobs (no multirun.yaml, and no "
                         "sub-directory with a status.json or metrics.jsonl): pass the directory "
                         "that `python -m moe_lm.train -m ...` printed as its sweep output dir.")
    text = markdown(sweep_dir, jobs)
    (sweep_dir / REPORT_MD).write_text(text)
    plot(jobs, sweep_dir / REPORT_PNG, f"validation loss: {sweep_dir.name}")
    return text, jobs
