"""The launch guard: refuse, in seconds and before allocating anything, a run this hardware cannot
hold, saying what it needs against what it has, how to launch it and how to plan it.

What it checks needs no model: the process count against the mesh, the device, and the memory
that parameters, gradients and AdamW states take on each rank at the very least (16 bytes per
parameter in fp32, split evenly over the ranks; `python -m moe_lm.plan` measures the full peak).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, replace

import torch

from moe_lm.config import TrainConfig
from moe_lm.errors import MoeLMError
from moe_lm.model import count_params

STATE_BYTES_PER_PARAM = 16  # fp32 parameter + fp32 gradient + AdamW exp_avg + exp_avg_sq
GIB = 2 ** 30


class LaunchError(MoeLMError):
    """The run cannot start on this hardware."""


@dataclass
class Hardware:
    """What this launch has: processes, the device type, memory per device (bytes)."""

    world_size: int
    device_type: str  # cuda | cpu
    memory_per_device: int
    description: str

    @classmethod
    def detect(cls, trainer_device: str) -> "Hardware":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if trainer_device != "cpu" and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return cls(world, "cuda", props.total_memory,
                       f"{torch.cuda.device_count()} x {props.name} on this node")
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return cls(world, "cpu", ram // max(world, 1),
                   f"CPU only (no CUDA), {ram / GIB:.0f} GiB RAM")


def required_state_bytes_per_rank(cfg: TrainConfig, vocab_size: int) -> tuple[int, int]:
    """(parameters, bytes per rank of parameters + gradients + AdamW states): every weight is
    split over dp_shard x ep ranks (HSDP replicates it over dp_replicate)."""
    model = cfg.model
    if model.vocab_size <= 0:
        model = replace(model, vocab_size=vocab_size)
    total = count_params(model, cfg.expert)["total"]
    p = cfg.parallel  # a lower bound under tp, whose ranks replicate the routed experts
    return total, total * STATE_BYTES_PER_PARAM // (p.pp * p.dp_shard * p.ep * p.tp)


def check_launch(cfg: TrainConfig, overrides: list[str], hw: Hardware,
                 vocab_size: int = 100277) -> None:
    """Raises LaunchError when `hw` cannot run `cfg`; returns quietly when it can."""
    p = cfg.parallel
    world = p.pp * p.dp_replicate * p.dp_shard * p.ep * p.tp
    params, state = required_state_bytes_per_rank(cfg, vocab_size)
    wants_cuda = cfg.trainer.device == "cuda"
    problems = []
    if hw.world_size != world:
        problems.append(f"{world} processes (mesh pp {p.pp} x dp_replicate {p.dp_replicate} x "
                        f"dp_shard {p.dp_shard} x ep {p.ep} x tp {p.tp}), has {hw.world_size}")
    if wants_cuda and hw.device_type != "cuda":
        problems.append("CUDA GPUs (trainer.device=cuda), has none")
    if state > hw.memory_per_device:
        problems.append(f"at least {state / GIB:,.1f} GiB per {'GPU' if wants_cuda else 'rank'} "
                        f"for parameters, gradients and AdamW states alone ({params / 1e9:,.1f}B "
                        f"parameters x {STATE_BYTES_PER_PARAM} B / {world} ranks), has "
                        f"{hw.memory_per_device / GIB:,.1f} GiB")
    if not problems:
        return
    per_node = cfg.plan.gpus_per_node
    nodes = max(1, -(-world // per_node))
    args = " ".join(shlex.quote(o) for o in overrides)
    raise LaunchError(
        "This run cannot start here. It needs " + "; ".join(problems) + f". This machine: "
        f"{hw.description}. Nothing was allocated.\n"
        f"  Plan it (any machine, no GPU): python -m moe_lm.plan {args}\n"
        f"  Check its shapes here on the meta device: python -m moe_lm.train {args} "
        "trainer.dry_run=true\n"
        f"  Launch it on {nodes} node(s) of {per_node} GPUs ({world} ranks): torchrun "
        f"--nnodes={nodes} --nproc_per_node={min(per_node, world)} --rdzv_backend=c10d "
        f"--rdzv_endpoint=$HEAD_NODE:29500 -m moe_lm.train {args} data.path=/path/to/corpus "
        "(on SLURM: one such torchrun per node via srun).")
