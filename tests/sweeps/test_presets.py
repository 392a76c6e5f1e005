"""The sweep presets and the SLURM launcher preset compose, and every job they expand to is valid."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

import moe_lm.conf
from moe_lm.config import register_configs, to_train_config
from moe_lm.launch.slurm import needs_torchrun

register_configs()
CONF = Path(moe_lm.conf.__file__).parent
SWEEPS = sorted(p.stem for p in (CONF / "experiment").glob("sweep_*.yaml"))


def compose_with_hydra(overrides: list[str], with_hydra: bool = True):
    with initialize_config_module(config_module="moe_lm.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=with_hydra)


def sweep_jobs(params: dict) -> list[list[str]]:
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return BasicSweeper.split_arguments(parsed, None)[0]


def test_router_and_expert_count_sweeps_exist():
    assert {"sweep_router", "sweep_experts"} <= set(SWEEPS)


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_preset_expands_into_small_jobs_that_all_validate(name):
    cfg = compose_with_hydra([f"+experiment={name}"])
    jobs = sweep_jobs(dict(cfg.hydra.sweeper.params))
    assert len(jobs) >= 2
    assert str(cfg.hydra.sweep.dir).startswith(f"multirun/{name}/")
    for job in jobs:
        train_cfg = to_train_config(compose_with_hydra([f"+experiment={name}", *job], False))
        m, t, d = train_cfg.model, train_cfg.trainer, train_cfg.data
        # runnable on a CPU in minutes: tiny width, short sequences, few steps
        assert m.d_model <= 128 and d.seq_len * d.batch_size <= 512 and t.max_steps <= 100


def test_router_sweep_covers_every_routing_preset():
    cfg = compose_with_hydra(["+experiment=sweep_router"])
    swept = set(str(cfg.hydra.sweeper.params["expert"]).split(","))
    assert swept == {p.stem for p in (CONF / "expert").glob("*.yaml")}


def test_slurm_launcher_preset_composes_with_the_keys_users_set():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_with_hydra([
        "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2",
        "hydra.launcher.gpus_per_node=4", "hydra.launcher.account=proj",
        "hydra.launcher.timeout_min=90", "+experiment=sweep_router"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.nodes, launcher.gpus_per_node, launcher.account,
            launcher.timeout_min) == ("gpu", 2, 4, "proj", 90)
    assert launcher.tasks_per_node == 1  # one task per node: it starts torchrun
    assert needs_torchrun({"SLURM_JOB_ID": "7"}, launcher._target_)
