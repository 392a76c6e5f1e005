"""Launching 2-process CPU runs in tests: the real CLI under torchrun, or workers via spawn."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch.multiprocessing as mp

from moe_lm.training.checkpoint import list_checkpoints
from tests.conftest import read_metrics

WORLD = 2
STEPS = 5
REL_TOL = 1e-5


def torchrun_train(run_dir: Path, overrides: list[str], nproc: int = WORLD,
                   timeout: float = 120) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N -m moe_lm.train hydra.run.dir=... overrides`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "moe_lm.train", f"hydra.run.dir={run_dir}",
           *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_losses_close(got: dict[int, float], want: dict[int, float], steps,
                        what: str = "loss") -> None:
    """Each step's value within REL_TOL (relative) of the reference."""
    for s in steps:
        assert s in got, f"step {s} missing from {sorted(got)}"
        assert abs(got[s] - want[s]) <= REL_TOL * abs(want[s]), (
            f"step {s}: {what} {got[s]!r} vs single process {want[s]!r}")


def grad_norms(run_dir: Path) -> dict[int, float]:
    """step -> logged gradient norm (the norm of the whole unsharded model)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    return {r["step"]: r["grad_norm"] for r in rows if "grad_norm" in r}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
                      WANDB_MODE="disabled")
    try:
        result = {"ok": True, "value": fn(rank, *args)}
    except BaseException as err:  # the parent inspects what each rank raised
        result = {"ok": False, "type": type(err).__name__, "message": str(err),
                  "traceback": traceback.format_exc()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def spawn_ranks(fn, args: tuple, out_dir: Path, world: int = WORLD,
                timeout: float = 90) -> list[dict]:
    """Runs `fn(rank, *args)` in `world` fresh processes (env:// variables set as torchrun would)
    and returns each rank's {"ok", "value"} or {"ok": False, "type", "message"}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(_worker, args=(world, free_port(), str(out_dir), fn, args),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks still running after {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


def assert_stopped_before_step(ranks: list[dict], run: Path, step: int) -> None:
    """Every rank stopped with a TrainingError naming `step`, before its optimizer step: the
    earlier steps are logged and nothing was saved from the poisoned step."""
    for r, result in enumerate(ranks):
        assert not result["ok"] and result["type"] == "TrainingError", (r, result)
        assert f"step {step}" in result["message"]
        assert "optimizer step was not taken" in result["message"]
    assert [row["step"] for row in read_metrics(run) if "loss" in row] == list(range(1, step))
    assert list_checkpoints(run) == []

