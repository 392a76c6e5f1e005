"""`python -m moe_lm.launch [--nproc-per-node N] [--dry-run] [key=value ...]`: torchrun under SLURM.

For hand-written sbatch scripts: run it with one task per node and it becomes that node's torchrun
(`os.execv`), training `moe_lm.train` with the given overrides on all GPUs of all nodes:

    #SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=8
    srun python -m moe_lm.launch +experiment=NAME hydra.run.dir=/shared/runs/NAME

Without `hydra.run.dir` every node uses `outputs/slurm-<job id>`, so all ranks share one run
directory. `--dry-run` prints the command instead of running it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from moe_lm.errors import MoeLMError
from moe_lm.launch.slurm import hydra_string, slurm_node, torchrun_command


def build_command(argv: list[str], env: dict[str, str]) -> tuple[list[str], bool]:
    """Parses the CLI; returns this node's torchrun argv and whether it is a dry run.

    Raises ConfigError outside SLURM or with more than one SLURM task per node.
    """
    parser = argparse.ArgumentParser(prog="python -m moe_lm.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="workers per node (default: the GPUs SLURM allocated, else 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    parser.add_argument("overrides", nargs="*", help="moe_lm.train overrides (key=value)")
    args = parser.parse_args(argv)
    node = slurm_node(env, args.nproc_per_node)
    overrides = list(args.overrides)
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        overrides.append(f"hydra.run.dir={hydra_string(f'outputs/slurm-{node.job_id}')}")
    return torchrun_command(node, overrides), args.dry_run


def main(argv: list[str] | None = None) -> None:
    """Builds the command from `os.environ` and execs it (or prints it with --dry-run)."""
    try:
        command, dry_run = build_command(sys.argv[1:] if argv is None else argv, dict(os.environ))
    except MoeLMError as err:
        print(f"moe_lm: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    if dry_run:
        print(shlex.join(command), flush=True)
        return
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
