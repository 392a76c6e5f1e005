"""Starting torchrun inside a SLURM job: one launcher task per node, torchrun spawns the GPU ranks.

The layout is the one torchrun expects on a cluster: SLURM starts one task on each node of the
allocation (`tasks_per_node: 1`), and that task runs

    python -m torch.distributed.run --nnodes=N --node_rank=R --nproc_per_node=G \
        --master_addr=<first node> --master_port=P -m moe_lm.train <overrides>

so every node starts G workers and all N*G of them meet at the first node. N, R and the first node
come from SLURM's environment (`SLURM_NNODES`, `SLURM_NODEID`, `SLURM_JOB_NODELIST`); G from the
launcher's `gpus_per_node`, else `SLURM_GPUS_ON_NODE` / `SLURM_GPUS_PER_NODE`, else 1; P from
`MASTER_PORT`, else derived from the job id so two jobs sharing a node do not collide.

Two callers: `moe_lm.train` when Hydra's submitit SLURM launcher runs a sweep job
(`hydra/launcher=slurm`), and `python -m moe_lm.launch` in a hand-written sbatch script.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from moe_lm.errors import ConfigError, MoeLMError
from moe_lm.launch.job_status import read_status, write_status

PORT_BASE, PORT_SPAN = 29500, 10000
TORCHRUN_ENV_MARKERS = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")  # set by torchrun in its workers


@dataclass(frozen=True)
class SlurmNode:
    """Where this task sits in its SLURM allocation, and how torchrun should be started there."""

    job_id: str
    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int


def in_slurm_job(env: Mapping[str, str]) -> bool:
    """True inside a SLURM allocation (`SLURM_JOB_ID` is set)."""
    return bool(env.get("SLURM_JOB_ID"))


def under_torchrun(env: Mapping[str, str]) -> bool:
    """True in a process that torchrun started (a worker, not the launcher task)."""
    return any(env.get(k) for k in TORCHRUN_ENV_MARKERS)


def needs_torchrun(env: Mapping[str, str], launcher_target: Optional[str]) -> bool:
    """Whether a `moe_lm.train` job must start torchrun instead of training itself.

    True for a sweep job that Hydra's submitit SLURM launcher started (the launcher's `_target_`
    names `SlurmLauncher`), running inside the SLURM job and not already under torchrun.
    """
    is_slurm_launcher = bool(launcher_target) and launcher_target.endswith("SlurmLauncher")
    return is_slurm_launcher and in_slurm_job(env) and not under_torchrun(env)


def check_launcher_plugin(argv: Sequence[str]) -> None:
    """`hydra/launcher=slurm` needs hydra-submitit-launcher: a clear error instead of Hydra's."""
    wants_slurm = any(a.replace(" ", "").startswith("hydra/launcher=slurm") for a in argv)
    if wants_slurm and importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        raise ConfigError("hydra/launcher=slurm needs Hydra's submitit launcher, which is not "
                          "installed: pip install \"moe-lm[slurm]\" (or hydra-submitit-launcher).")


def expand_nodelist(nodelist: str) -> list[str]:
    """Expands SLURM's compressed host list: `gpu[01-03,7],login1` -> gpu01 gpu02 gpu03 gpu7 login1.

    Handles zero padding, several bracket groups in one name (`r[1-2]n[1-2]`) and plain names.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_item(item))
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    items, depth, current = [], 0, ""
    for ch in nodelist:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    if depth != 0:
        raise ConfigError(f"SLURM node list {nodelist!r} has unbalanced brackets.")
    items.append(current)
    return [i for i in items if i]


def _expand_item(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        return [item]
    head, tail = item[: match.start()], item[match.end():]
    names = []
    for part in match.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ConfigError(f"SLURM node list entry {item!r} has a range {part!r} that is not "
                              "numeric.")
        width = len(lo)
        for n in range(int(lo), int(hi or lo) + 1):
            names.append(f"{head}{n:0{width}d}")
    return [name + rest for name in names for rest in _expand_item(tail)]


def gpus_per_node(env: Mapping[str, str], requested: Optional[int] = None) -> int:
    """Workers per node: `requested` if given, else the GPUs SLURM gave this node, else 1."""
    if requested:
        return int(requested)
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key, "")
        # forms: "8", "h100:8", "gpu:a100:4(IDX:0-3)"
        match = re.match(r"^(?:[\w-]+:)*(\d+)", value.strip())
        if match:
            return max(1, int(match.group(1)))
    return 1


def slurm_node(env: Mapping[str, str], nproc_per_node: Optional[int] = None) -> SlurmNode:
    """Reads this task's place in the allocation from SLURM's environment variables.

    Raises ConfigError outside SLURM, or when SLURM started more than one task per node (torchrun
    starts the per-GPU processes itself).
    """
    if not in_slurm_job(env):
        raise ConfigError("No SLURM allocation here (SLURM_JOB_ID is not set). Start this inside "
                          "an sbatch script with `srun --ntasks-per-node=1 python -m moe_lm.launch "
                          "...`, use hydra/launcher=slurm, or on one machine run `torchrun "
                          "--nproc_per_node=N -m moe_lm.train ...`.")
    nnodes = int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
    ntasks = int(env.get("SLURM_NTASKS") or nnodes)
    if ntasks != nnodes:
        raise ConfigError(f"SLURM started {ntasks} tasks on {nnodes} node(s); torchrun needs "
                          "exactly one per node (it starts one process per GPU itself). Set "
                          "hydra.launcher.tasks_per_node=1 (or srun --ntasks-per-node=1).")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise ConfigError("SLURM_JOB_NODELIST is empty: cannot tell which node hosts rank 0.")
    job_id = env["SLURM_JOB_ID"]
    port = env.get("MASTER_PORT")
    if port is None:
        digits = re.sub(r"\D", "", job_id) or "0"
        port = str(PORT_BASE + int(digits) % PORT_SPAN)
    return SlurmNode(job_id=job_id, nnodes=nnodes, node_rank=int(env.get("SLURM_NODEID", 0)),
                     nproc_per_node=gpus_per_node(env, nproc_per_node), master_addr=hosts[0],
                     master_port=int(port))


def torchrun_command(node: SlurmNode, train_args: Sequence[str],
                     python: str = sys.executable) -> list[str]:
    """The argv that starts this node's torchrun for `python -m moe_lm.train <train_args>`."""
    return [
        python, "-m", "torch.distributed.run",
        f"--nnodes={node.nnodes}", f"--node_rank={node.node_rank}",
        f"--nproc_per_node={node.nproc_per_node}",
        f"--master_addr={node.master_addr}", f"--master_port={node.master_port}",
        "-m", "moe_lm.train", *train_args,
    ]


def hydra_string(value: str) -> str:
    """`value` as a quoted Hydra override value (paths, names holding `=` or `,` stay strings)."""
    return "'" + str(value).replace("'", "\\'") + "'"  # Hydra unescapes only escaped quotes


def run_torchrun(command: Sequence[str]) -> int:
    """Runs torchrun to the end and returns its exit code (SIGTERM reaches the workers directly:
    SLURM signals every process of the job step, and each worker checkpoints and exits)."""
    return subprocess.run(list(command), check=False).returncode


def run_job_under_torchrun(run_dir: str, train_args: Sequence[str], env: Mapping[str, str],
                           nproc_per_node: Optional[int] = None) -> Optional[float]:
    """A SLURM sweep job's launcher task: starts this node's torchrun, waits, returns the val loss.

    The workers train with `hydra.run.dir=<run_dir>` and write `status.json` there (rank 0); when
    torchrun fails before they could say so, node 0 records the failure itself. Raises MoeLMError
    when torchrun exits non-zero, so Hydra marks the job failed.
    """
    node = slurm_node(env, nproc_per_node)
    command = torchrun_command(node, [f"hydra.run.dir={hydra_string(run_dir)}", *train_args])
    print(f"node {node.node_rank}/{node.nnodes}: {' '.join(command)}", flush=True)
    code = run_torchrun(command)
    status = read_status(run_dir)
    if code != 0:
        message = (f"torchrun exited with code {code} on node {node.node_rank} of SLURM job "
                   f"{node.job_id}; see the job's log in the sweep's .submitit/ folder.")
        if node.node_rank == 0 and (status is None or status.get("status") == "running"):
            write_status(run_dir, "failed", error=message)
        raise MoeLMError(message)
    return None if status is None else status.get("val_loss")
