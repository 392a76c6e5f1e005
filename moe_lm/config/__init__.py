"""Typed configuration: the dataclass schemas that Hydra validates YAML and CLI overrides against.

Hydra composes `conf/` against these schemas (unknown keys and wrong types fail at compose time);
`to_train_config` turns the composed DictConfig into plain dataclasses once, and `validate` checks
the cross-field rules that types alone cannot express. Below the entry point no code sees Hydra.
"""

from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moe_lm.config.checks import check_layer_sharing, validate
from moe_lm.config.schema import (
    ModelConfig, ExpertConfig, LossConfig, ParallelConfig, SourceConfig, DataConfig,
    PrepareConfig, OptimConfig, RoutingMonitorConfig, TrainerConfig, WandbConfig, LoggerConfig,
    PlanConfig, InitConfig, TrainConfig, GROUP_SCHEMAS,
)
from moe_lm.start_time import agreed_start_time

__all__ = [
    "DataConfig", "ExpertConfig", "GROUP_SCHEMAS", "InitConfig", "LoggerConfig", "LossConfig",
    "ModelConfig", "OptimConfig", "ParallelConfig", "PlanConfig", "PrepareConfig",
    "RoutingMonitorConfig", "SourceConfig", "TrainConfig", "TrainerConfig", "WandbConfig",
    "check_layer_sharing", "register_configs", "to_train_config", "validate",
]


def register_configs() -> None:
    """Registers the root schema so that every composed config is checked against TrainConfig."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("run_start"):  # the default run dir: one per torchrun job
        OmegaConf.register_new_resolver("run_start", _run_start, use_cache=True)
    if not OmegaConf.has_resolver("run_kind"):  # plans and dry runs: outputs/plans/...
        OmegaConf.register_new_resolver("run_kind", run_kind)


def run_kind(job_name: str, dry_run: Any) -> str:
    """`${run_kind:${hydra.job.name},${trainer.dry_run}}`: `plans/` for plans and dry runs, ''
    for training runs, so that they do not mix with real runs in `outputs/`."""
    return "plans/" if job_name == "plan" or str(dry_run).lower() == "true" else ""


def _run_start(pattern: str) -> str:
    """`${run_start:%H-%M-%S}`: like Hydra's `${now:...}`, but every rank of a torchrun job
    resolves the same start time, so all ranks share one run directory."""
    return agreed_start_time().strftime(pattern)


def to_train_config(cfg: DictConfig | dict[str, Any]) -> TrainConfig:
    """Turns a composed config (DictConfig or plain dict) into validated dataclasses."""
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), _without_hydra(cfg))
    out: TrainConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(out)
    return out


def _without_hydra(cfg: Any) -> Any:
    """The job's keys, resolved; the `hydra` node is dropped before resolving (its runtime
    interpolations only resolve inside a running Hydra app)."""
    if isinstance(cfg, DictConfig):
        return {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig)
                else cfg[k] for k in cfg if k != "hydra"}
    return {k: v for k, v in cfg.items() if k != "hydra"}
