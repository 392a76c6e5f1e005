"""Dashboards as code: the wandb workspace of a moe_lm project, built from the run config.

The workspace has four sections: loss (total, LM, validation, and each loss term the run logs; for
a data mixture also each source's validation loss and epochs seen), routing balance (load
imbalance, dropped fraction, router entropy, the aux_free bias range and the expert-load
heatmaps), routing per layer (one panel per MoE layer and one per routing metric across layers)
and throughput. The MoE layers come from the config, composed like `python -m moe_lm.train`
composes it (the same `key=value` overrides, e.g. `model.n_layers=8 expert=aux_free`), or from a
run directory's `.hydra/config.yaml` with `--run-dir`.

Building and validating need no network: the workspace is converted to the wandb view schema
(`wandb-workspaces` validates every panel), and with `--run-dir` every metric a panel plots must
appear in that run's `metrics.jsonl`. `--out FILE` writes the view spec as JSON. Only `--save`
talks to the wandb server (it needs `wandb login` or WANDB_API_KEY).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from moe_lm.config import TrainConfig, register_configs, to_train_config
from moe_lm.errors import ConfigError, MoeLMError
from moe_lm.model.transformer import is_moe_layer
from moe_lm.planning.dry_run import loss_term_names

HEATMAP_KEY = "moe/expert_load_heatmap"  # the image the training loop logs at each eval
LAYER_METRICS = ("load_imbalance", "load_cv", "dropped_frac", "router_entropy")


def moe_layer_count(cfg: TrainConfig) -> int:
    """How many layers of the model are MoE (the `i` of the `moe/layer{i}/...` keys)."""
    return sum(is_moe_layer(i, cfg.model) for i in range(cfg.model.n_layers))


def panel_metrics(cfg: TrainConfig) -> dict[str, list[tuple[str, list[str]]]]:
    """Section name -> [(panel title, metrics plotted)]: the dashboard's content, without wandb."""
    n_moe = moe_layer_count(cfg)
    layers = range(n_moe)
    routing: list[tuple[str, list[str]]] = [
        ("load imbalance (max / mean tokens per expert)", ["moe/load_imbalance"]),
        ("dropped fraction", ["moe/dropped_frac"]),
        ("router entropy (nats)", ["moe/router_entropy"]),
    ]
    if cfg.expert.bias_update_rate > 0:
        routing.append(("aux_free selection bias, largest |value|", ["moe/score_bias_absmax"]))
    per_layer = [(f"layer {i}: balance", [f"moe/layer{i}/{m}" for m in LAYER_METRICS])
                 for i in layers]
    per_layer += [(f"{m} by layer", [f"moe/layer{i}/{m}" for i in layers]) for m in LAYER_METRICS]
    names = [s.name for s in cfg.data.sources]  # a data mixture: its per-source rows
    mixture = [("validation loss per source", [f"val/{n}/loss" for n in names]),
               ("epochs seen per source", [f"data/{n}/epochs" for n in names])] if names else []
    return {
        "Loss": [
            ("loss", ["loss", "lm_loss"]),
            ("validation loss", ["val_loss"]),
            *mixture,
            # one panel per loss term the run logs (balance, z-loss, objectives, ...), unweighted
            *[(f"{name} (loss term)", [name]) for name in loss_term_names(cfg)],
            ("learning rate", ["lr"]),
            ("gradient norm", ["grad_norm"]),
        ],
        "Routing balance": routing if n_moe else [],
        "Routing per layer": per_layer,
        "Throughput": [
            ("tokens per second", ["tokens_per_s"]),
            ("tokens seen", ["tokens"]),
            ("step time (s)", ["step_time"]),
        ],
    }


def build_workspace(cfg: TrainConfig, entity: str, project: str, name: str):
    """The `wandb_workspaces` Workspace for runs of `cfg` (built offline; nothing is sent)."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as err:
        raise MoeLMError("moe_lm.dashboard needs the wandb-workspaces package: "
                         "pip install wandb-workspaces (or pip install -e .).") from err
    sections = []
    for title, panels in panel_metrics(cfg).items():
        if not panels:
            continue
        plots: list[Any] = [wr.LinePlot(title=t, x="Step", y=list(ys)) for t, ys in panels]
        if title == "Routing balance":
            plots.append(wr.MediaBrowser(title="expert load heatmap (each eval)",
                                         media_keys=[HEATMAP_KEY], num_columns=1))
        sections.append(ws.Section(name=title, panels=plots, is_open=True,
                                   layout_settings=ws.SectionLayoutSettings(columns=3, rows=2)))
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections,
                        settings=ws.WorkspaceSettings(x_axis="Step", group_by_prefix="first"))


def validate_workspace(workspace, run_dir: Optional[Path] = None) -> dict[str, Any]:
    """Converts the workspace to the wandb view schema (pydantic-checked) and returns the spec.

    With `run_dir`, every metric a panel plots must appear in that run's `metrics.jsonl`:
    a panel on a key the trainer never writes would stay empty.
    """
    from pydantic import ValidationError

    try:
        spec = workspace._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")
    except ValidationError as err:
        raise MoeLMError(f"the dashboard does not fit wandb's view schema: {err}") from err
    if run_dir is not None:
        logged = logged_metric_keys(Path(run_dir) / "metrics.jsonl")
        missing = sorted({m for m in plotted_metrics(workspace) if m not in logged})
        if missing:
            raise MoeLMError(
                f"{len(missing)} dashboard metrics never appear in {run_dir}/metrics.jsonl: "
                f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}. Build the "
                "dashboard with the run's own config (--run-dir, or the overrides it was "
                "trained with), or train past the first log step.")
    return spec


def plotted_metrics(workspace) -> list[str]:
    """Every metric name a line plot of the workspace draws."""
    return [y for s in workspace.sections for p in s.panels for y in getattr(p, "y", None) or []]


def logged_metric_keys(metrics_path: Path) -> set[str]:
    """The keys that appear in any row of a run's metrics.jsonl."""
    if not metrics_path.is_file():
        raise MoeLMError(f"{metrics_path} does not exist: pass --run-dir a moe_lm run directory "
                         "(it holds metrics.jsonl and .hydra/config.yaml).")
    keys: set[str] = set()
    for line in metrics_path.read_text().splitlines():
        if line.strip():
            keys.update(json.loads(line))
    return keys


def load_config(overrides: Sequence[str], run_dir: Optional[Path]) -> TrainConfig:
    """The run config: a run directory's `.hydra/config.yaml`, or `conf/` plus `overrides`."""
    if run_dir is not None:
        from omegaconf import OmegaConf

        path = Path(run_dir) / ".hydra" / "config.yaml"
        if not path.is_file():
            raise MoeLMError(f"{path} does not exist: --run-dir takes a directory written by "
                             "python -m moe_lm.train.")
        if overrides:
            raise ConfigError("--run-dir takes the run's own config: drop the overrides "
                              f"{' '.join(overrides)} or drop --run-dir.")
        return to_train_config(OmegaConf.load(path))
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    try:
        with initialize_config_module(config_module="moe_lm.conf", version_base="1.3"):
            return to_train_config(compose(config_name="config", overrides=list(overrides)))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"the overrides {' '.join(overrides)} do not compose: {err}") from err


def save_workspace(workspace) -> str:
    """Saves the workspace to the wandb server; returns its URL."""
    try:
        workspace.save()
        return workspace.url
    except Exception as err:  # network, login and permission errors all end here
        raise MoeLMError(
            f"saving the workspace to wandb failed ({type(err).__name__}: {err}). Saving needs "
            "the wandb server: run `wandb login` (or set WANDB_API_KEY), check that --entity and "
            "--project exist and that you may write to them; building without --save needs "
            "neither.") from err


def wandb_target(cfg: TrainConfig, entity: Optional[str], project: Optional[str],
                 save: bool) -> tuple[str, str]:
    """(entity, project): the given ones, else the config's `logger.wandb`; offline validation
    needs neither, only saving needs an entity."""
    entity = entity or cfg.logger.wandb.entity
    if entity is None and save:
        raise ConfigError("--save needs the wandb entity to write the workspace to: pass "
                          "--entity E (or train with logger.wandb.entity=E).")
    return entity or "", project or cfg.logger.wandb.project


def make_dashboard(overrides: Sequence[str], run_dir: Optional[Path], entity: Optional[str],
                   project: Optional[str], name: str, out: Optional[Path] = None,
                   save: bool = False):
    """Builds and validates the workspace (writing its view spec to `out` if given); returns the
    workspace and a one-line summary of it. Entity and project default to the config's."""
    cfg = load_config(overrides, run_dir)
    entity, project = wandb_target(cfg, entity, project, save)
    workspace = build_workspace(cfg, entity, project, name)
    spec = validate_workspace(workspace, run_dir)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(spec, indent=1))
    n_panels = sum(len(s.panels) for s in workspace.sections)
    summary = (f"workspace {name!r} for {entity or '(no entity)'}/{project}: "
               f"{len(workspace.sections)} sections, "
               f"{n_panels} panels, {moe_layer_count(cfg)} MoE layers; valid.")
    return workspace, summary
