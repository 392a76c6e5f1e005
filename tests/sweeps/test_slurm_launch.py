"""SLURM -> torchrun: node lists, this node's torchrun command, and when a sweep job starts torchrun.

No SLURM cluster is reachable here, so these tests hand the launcher the environment SLURM would
set in a job (fake SLURM_* variables) and check the command it builds.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from moe_lm.errors import ConfigError
from moe_lm.launch.__main__ import build_command
from moe_lm.launch.slurm import (
    PORT_BASE,
    PORT_SPAN,
    check_launcher_plugin,
    expand_nodelist,
    gpus_per_node,
    hydra_string,
    needs_torchrun,
    slurm_node,
    torchrun_command,
)

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def fake_slurm_env(node_id: int = 1, **extra: str) -> dict[str, str]:
    """What SLURM sets in one task of a 2-node job with 4 GPUs per node, one task per node."""
    return {"SLURM_JOB_ID": "123456", "SLURM_NNODES": "2", "SLURM_NTASKS": "2",
            "SLURM_NODEID": str(node_id), "SLURM_PROCID": str(node_id),
            "SLURM_JOB_NODELIST": "gpu-[007-008]", "SLURM_GPUS_ON_NODE": "4", **extra}


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("a[8-10],b1", ["a8", "a9", "a10", "b1"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("gpu-[007-008],login", ["gpu-007", "gpu-008", "login"]),
])
def test_expand_nodelist_matches_scontrol_show_hostnames(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_expand_nodelist_rejects_malformed_lists():
    with pytest.raises(ConfigError, match="unbalanced"):
        expand_nodelist("gpu[01-02")
    with pytest.raises(ConfigError, match="not numeric"):
        expand_nodelist("gpu[a-b]")


def test_torchrun_command_places_each_node_in_the_job():
    for node_id in (0, 1):
        cmd = torchrun_command(slurm_node(fake_slurm_env(node_id)), ["optim.lr=0.001"],
                               python="/py")
        assert cmd == ["/py", "-m", "torch.distributed.run", "--nnodes=2",
                       f"--node_rank={node_id}", "--nproc_per_node=4",
                       "--master_addr=gpu-007", f"--master_port={PORT_BASE + 123456 % PORT_SPAN}",
                       "-m", "moe_lm.train", "optim.lr=0.001"]


def test_gpus_per_node_prefers_the_launcher_setting_then_slurm_then_one():
    assert gpus_per_node({"SLURM_GPUS_ON_NODE": "4"}, requested=8) == 8
    assert gpus_per_node({"SLURM_GPUS_ON_NODE": "4"}) == 4
    assert gpus_per_node({"SLURM_GPUS_PER_NODE": "h100:8"}) == 8
    assert gpus_per_node({"SLURM_GPUS_PER_NODE": "gpu:a100:2(IDX:0-1)"}) == 2
    assert gpus_per_node({}) == 1


def test_master_port_comes_from_env_else_differs_between_jobs():
    assert slurm_node(fake_slurm_env(MASTER_PORT="29999")).master_port == 29999
    ports = {slurm_node(fake_slurm_env(SLURM_JOB_ID=str(j))).master_port for j in (100, 101)}
    assert len(ports) == 2 and all(PORT_BASE <= p < PORT_BASE + PORT_SPAN for p in ports)


def test_slurm_node_errors_outside_slurm_and_with_several_tasks_per_node():
    with pytest.raises(ConfigError, match="SLURM_JOB_ID is not set"):
        slurm_node({})
    with pytest.raises(ConfigError, match="tasks_per_node=1"):
        slurm_node(fake_slurm_env(SLURM_NTASKS="8"))


def test_only_the_slurm_launchers_job_task_starts_torchrun():
    env = fake_slurm_env(0)
    assert needs_torchrun(env, SLURM_LAUNCHER)
    assert not needs_torchrun(env, "hydra._internal.core_plugins.basic_launcher.BasicLauncher")
    assert not needs_torchrun({}, SLURM_LAUNCHER)  # submitit's local executor: no SLURM
    assert not needs_torchrun({**env, "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "x"},
                              SLURM_LAUNCHER)  # a torchrun worker trains itself


def test_hydra_string_survives_hydra_override_parsing():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for value in ["/shared/runs/a b/~x", "expert=top2,optim.lr=0.001", "it's", ""]:
        assert parser.parse_override(f"key={hydra_string(value)}").value() == value


def test_launch_cli_defaults_one_run_dir_for_all_nodes():
    cmd0, dry = build_command(["--dry-run", "+experiment=tiny_fp32"], fake_slurm_env(0))
    cmd1, _ = build_command(["--nproc-per-node=2", "x=1"], fake_slurm_env(1))
    assert dry and cmd0[-2:] == ["+experiment=tiny_fp32", "hydra.run.dir='outputs/slurm-123456'"]
    assert "--nproc_per_node=2" in cmd1 and "--node_rank=1" in cmd1
    explicit, _ = build_command(["hydra.run.dir=/r"], fake_slurm_env(0))
    assert explicit[-1] == "hydra.run.dir=/r"


def test_launch_cli_prints_the_command_in_a_fake_job_and_errors_outside_one():
    out = subprocess.run([sys.executable, "-m", "moe_lm.launch", "--dry-run", "optim.lr=0.001"],
                         env={**_base_env(), **fake_slurm_env(1)}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout.strip().splitlines()[-1])
    assert argv[1:8] == ["-m", "torch.distributed.run", "--nnodes=2", "--node_rank=1",
                         "--nproc_per_node=4", "--master_addr=gpu-007",
                         f"--master_port={PORT_BASE + 123456 % PORT_SPAN}"]
    assert argv[8:] == ["-m", "moe_lm.train", "optim.lr=0.001",
                        "hydra.run.dir='outputs/slurm-123456'"]
    bad = subprocess.run([sys.executable, "-m", "moe_lm.launch"], env=_base_env(),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "SLURM_JOB_ID is not set" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_slurm_launcher_without_its_plugin_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if "submitit" in name else real(name, *a))
    with pytest.raises(ConfigError, match=r"moe-lm\[slurm\]"):
        check_launcher_plugin(["-m", "hydra/launcher=slurm"])
    check_launcher_plugin(["-m", "optim.lr=1e-3,3e-3"])  # no SLURM asked for: nothing to check


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
