"""lm-evaluation-harness tasks on a moe_lm model: running them, their metrics, their record.

`run_tasks` hands a `MoeLM` to `lm_eval.simple_evaluate` (tasks by lm-eval name, plus the task
YAMLs of `include_path`) and turns lm-eval's failures into clear errors: an unknown task name, a
dataset that cannot be fetched (no network: how to point a task at local files). `task_metrics`
reads `{task: {metric: value}}` out of lm-eval's results, `metric_rows` the flat
`eval/<task>/<metric>` keys the training loop logs, and `record_results` appends a run of tasks
to `<run dir>/eval/<step>/lm_eval.json` without losing earlier runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from moe_lm.config import TrainConfig
from moe_lm.data import Tokenizer
from moe_lm.errors import ConfigError, DataError
from moe_lm.inference.lm_eval_model import MoeLM, require_lm_eval
from moe_lm.inference.loading import LoadedModel
from moe_lm.model import Transformer
from moe_lm.training import distributed as dist_utils

OFFLINE_HINT = (
    "lm-eval reads a task's dataset from the Hugging Face Hub, which needs network access or a "
    "copy in the datasets cache (HF_DATASETS_CACHE; set HF_DATASETS_OFFLINE=1 to use only the "
    "cache and not wait on the network). To run offline, point the task at local files: write a "
    "task YAML with `dataset_path: json` and `dataset_kwargs: {data_files: {test: "
    "/path/to/docs.jsonl}}` (or a local dataset directory as `dataset_path`) and pass its "
    "directory with --include-path DIR (trainer.eval_tasks_include_path in training); relative "
    "data_files are read from the working directory.")


def parse_tasks(tasks: str | list[str]) -> list[str]:
    """`"a,b"` or `["a", "b"]` -> `["a", "b"]` (blanks dropped)."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    return [n.strip() for n in names if n and n.strip()]


def run_tasks(lm: MoeLM, tasks: str | list[str], num_fewshot: int | None = None,
              limit: int | None = None, include_path: str | None = None,
              log_samples: bool = False) -> dict[str, Any]:
    """lm-eval's results dict for `tasks` (`results`, `configs`, `n-shot`, `versions`, ...)."""
    require_lm_eval()
    import lm_eval  # the optional [eval] extra; simple_evaluate pulls in the task registry
    from lm_eval.tasks import TaskManager

    names = parse_tasks(tasks)
    if not names:
        raise ConfigError("No tasks given: pass lm-eval task names, e.g. --tasks hellaswag,arc_easy.")
    if include_path and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path {include_path} is not a directory of task YAMLs.")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot,
                                      limit=limit or None, task_manager=manager,
                                      log_samples=log_samples, bootstrap_iters=0)
    except KeyError as err:  # lm-eval's "Spec 'x' is not a registered task/group/tag name"
        raise ConfigError(f"lm-eval does not know a task of {names}: {err}. Use lm-eval's task "
                          "names (`lm_eval ls tasks`) or pass the directory of your own task "
                          "YAMLs with --include-path DIR.") from err
    except (ConnectionError, FileNotFoundError) as err:
        offline = os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false")
        raise DataError(f"lm-eval could not load the dataset of {', '.join(names)} "
                        f"({type(err).__name__}: {err}; HF_DATASETS_OFFLINE="
                        f"{'1' if offline else 'unset'}). {OFFLINE_HINT}") from err
    return out


def task_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """`{task: {metric: value}}`: lm-eval's `"acc,none"` keys become `acc` (other filters keep
    theirs, `exact_match,strict-match` -> `exact_match/strict-match`); stderrs and aliases go."""
    out: dict[str, dict[str, float]] = {}
    for task, row in results["results"].items():
        metrics = {}
        for key, value in row.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            metrics[metric if filt == "none" else f"{metric}/{filt}"] = float(value)
        out[task] = metrics
    return out


def metric_rows(results: dict[str, Any]) -> dict[str, float]:
    """The flat `eval/<task>/<metric>` values logged with a training step's validation row."""
    return {f"eval/{task}/{metric}": value for task, metrics in task_metrics(results).items()
            for metric, value in metrics.items() if math.isfinite(value)}


def record_results(run_dir: Path, step: int, results: dict[str, Any],
                   settings: dict[str, Any]) -> Path:
    """Appends this run of tasks to `<run_dir>/eval/<step>/lm_eval.json` and returns the path.

    The file keeps every run (`runs`: settings, lm-eval's results, n-shot, versions and configs)
    and `results`, each task's latest metrics.
    """
    path = Path(run_dir) / "eval" / f"{step:07d}" / "lm_eval.json"
    record: dict[str, Any] = {"step": step, "results": {}, "runs": []}
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except ValueError as err:
            raise DataError(f"{path} is not valid JSON ({err}); move it away to write new "
                            "results (it is kept, not overwritten).") from err
    metrics = task_metrics(results)
    record["results"].update(metrics)
    record["runs"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **settings,
                           "results": metrics,
                           **{k: results.get(k) for k in ("n-shot", "versions", "configs")}})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)
    return path


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's own markdown table of the results (and of the groups, when there are any)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def add_task_args(parser: argparse.ArgumentParser) -> None:
    """`--tasks`, `--num-fewshot`, `--limit`, `--include-path` of `python -m moe_lm.eval`."""
    parser.add_argument("--tasks", default=None,
                        help="lm-eval tasks to run instead of the loss, e.g. hellaswag,arc_easy")
    parser.add_argument("--num-fewshot", type=int, default=None,
                        help="few-shot examples per task (default: each task's own)")
    parser.add_argument("--limit", type=int, default=None,
                        help="score only the first N documents of each task")
    parser.add_argument("--include-path", default=None,
                        help="a directory of your own lm-eval task YAMLs (e.g. on local files)")


def evaluate_tasks(loaded: LoadedModel, tasks: str, num_fewshot: int | None = None,
                   limit: int | None = None, batch_size: int | None = None,
                   include_path: str | None = None, precision: str | None = None,
                   quantize: str = "none") -> tuple[dict[str, Any], str]:
    """Runs lm-eval tasks on a loaded model, records them in the run directory.

    Returns one JSON-able row (`results`: task -> metric -> value) and lm-eval's results table.
    `batch_size` (requests per forward) defaults to the run's `data.batch_size`.
    """
    lm = MoeLM(loaded, batch_size=batch_size or loaded.cfg.data.batch_size, precision=precision)
    results = run_tasks(lm, tasks, num_fewshot, limit, include_path)
    settings = {"tasks": parse_tasks(tasks), "num_fewshot": num_fewshot, "limit": limit,
                "batch_size": lm.batch_size, "precision": lm.precision, "quantize": quantize,
                "include_path": include_path, "checkpoint": str(loaded.ckpt.path)}
    record = None
    if loaded.run_dir is not None:
        record = str(record_results(loaded.run_dir, loaded.ckpt.step, results, settings))
    row = {"step": loaded.ckpt.step, **settings, "results": task_metrics(results),
           "record": record}
    where = record or "not recorded: the checkpoint is not inside a run directory"
    return row, f"{results_table(results)}\nstep {loaded.ckpt.step}, results: {where}"


class TrainingTaskEval:
    """`trainer.eval_tasks` at each evaluation of a training run: the Trainer's `task_eval`.

    Checks at start-up that lm-eval is installed and the include path exists. Each call runs the
    tasks on the live model (`trainer.eval_tasks_limit` documents each, the run's context
    `data.seq_len`, `data.batch_size` requests per forward, `trainer.precision`), records them in
    `<run dir>/eval/<step>/lm_eval.json` (rank 0) and returns the `eval/<task>/<metric>` values.
    Every rank runs the same requests: FSDP and expert-parallel forwards need all ranks.
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path):
        require_lm_eval()
        t = cfg.trainer
        self.tasks = parse_tasks(t.eval_tasks)
        self.include_path = t.eval_tasks_include_path
        if self.include_path and not Path(self.include_path).expanduser().is_dir():
            raise ConfigError(f"trainer.eval_tasks_include_path={self.include_path} is not a "
                              "directory of lm-eval task YAMLs.")
        self.cfg, self.run_dir = cfg, Path(run_dir)

    def __call__(self, model: Transformer, tokenizer: Tokenizer, step: int) -> dict[str, float]:
        t = self.cfg.trainer
        lm = MoeLM(model=model, tokenizer=tokenizer, max_length=self.cfg.data.seq_len,
                   batch_size=self.cfg.data.batch_size, precision=t.precision)
        results = run_tasks(lm, self.tasks, t.eval_tasks_num_fewshot, t.eval_tasks_limit or None,
                            self.include_path)
        if dist_utils.rank() == 0:
            record_results(self.run_dir, step, results, {
                "tasks": self.tasks, "num_fewshot": t.eval_tasks_num_fewshot,
                "limit": t.eval_tasks_limit or None, "batch_size": lm.batch_size,
                "precision": lm.precision, "include_path": self.include_path,
                "source": "training"})
        return metric_rows(results)
