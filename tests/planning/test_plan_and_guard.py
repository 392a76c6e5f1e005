"""`python -m moe_lm.plan`, the launch guard of `python -m moe_lm.train` and `trainer.dry_run`."""

import json
import subprocess
import sys
import time

import pytest

from moe_lm.config import ParallelConfig
from moe_lm.model import count_params
from moe_lm.planning import format_plan, make_plan
from moe_lm.planning.guard import Hardware, LaunchError, check_launch
from tests.planning.test_counting import make_cfg
from tests.training.helpers import train_in_process

GIB = 2 ** 30
CPU_BOX = Hardware(world_size=1, device_type="cpu", memory_per_device=16 * GIB, description="x")


def run_module(module: str, run_dir, *overrides: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", module, f"hydra.run.dir={run_dir}", *overrides],
                          capture_output=True, text=True, timeout=300)
    return proc, time.time() - start


def test_plan_of_the_tiny_default_reports_every_key_and_fits_one_gpu():
    plan = make_plan(make_cfg({}, vocab=100277))
    for key in ("total_params", "active_params", "flops_per_token", "memory_per_gpu_bytes",
                "min_gpus", "step_time_s", "time_to_train_s", "prepare"):
        assert key in plan
    assert plan["prepare"]["tokens"] == plan["train_tokens"]
    assert plan["total_params"] == count_params(make_cfg({}, 100277).model, make_cfg({}).expert)[
        "total"]
    assert plan["fits"] and plan["min_gpus"] == 1
    assert "TOTAL" in format_plan(plan)


@pytest.mark.slow
def test_plan_cli_for_1t_moe_writes_plan_json_within_a_minute_or_two(tmp_path):
    proc, seconds = run_module("moe_lm.plan", tmp_path, "+experiment=1t_moe")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert 0.95e12 <= plan["total_params"] <= 1.15e12
    assert plan["active_params"] < plan["total_params"] / 10  # top-2 of 64 experts
    assert plan["mesh"]["world_size"] == 512 and plan["fits"]
    assert plan["memory_per_gpu_bytes"] <= plan["usable_gpu_memory_bytes"]
    assert 1 <= plan["min_gpus"] <= 512
    assert plan["time_to_train_s"] > 0 and "TOTAL" in proc.stdout
    assert "data preparation (python -m moe_lm.prepare) of 2.097T tokens" in proc.stdout
    assert seconds < 120  # the minute, with room for a loaded 2-core CI box


def test_launch_guard_refuses_1t_moe_here_in_seconds_saying_needs_has_launch_and_plan(tmp_path):
    proc, seconds = run_module("moe_lm.train", tmp_path, "+experiment=1t_moe")
    assert proc.returncode == 2
    err = proc.stderr
    assert "Traceback" not in err
    for words in ("512 processes", "has 1", "CUDA", "GiB per GPU", "torchrun --nnodes=64",
                  "--nproc_per_node=8", "python -m moe_lm.plan +experiment=1t_moe",
                  "trainer.dry_run=true"):
        assert words in err, words
    assert seconds < 30
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_launch_guard_passes_a_run_that_fits_and_names_each_shortfall():
    check_launch(make_cfg({}), [], CPU_BOX)  # the tiny default: fits, returns quietly
    cfg = make_cfg({"trainer.device": "cuda"})
    cfg.parallel = ParallelConfig(dp_shard=2)
    with pytest.raises(LaunchError) as err:
        check_launch(cfg, ["parallel.dp_shard=2"], CPU_BOX)
    assert "2 processes" in str(err.value) and "CUDA" in str(err.value)
    assert "GiB per" not in str(err.value)  # the memory fits: not listed


def test_dry_run_of_1t_moe_runs_forward_and_backward_on_meta(tmp_path, tiny_overrides):
    result = train_in_process(tmp_path, ["+experiment=1t_moe", "trainer.dry_run=true"])
    assert result["dry_run"] == "ok" and 0.95e12 <= result["params"] <= 1.15e12
    assert result["moe_layers"] == 32 and result["micro_batch"] == [1, 4096]
    assert (tmp_path / "dry_run.json").exists() and not (tmp_path / "checkpoints").exists()
