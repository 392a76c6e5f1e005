"""A sweep through Hydra's submitit SLURM launcher, end to end, against a stand-in SLURM.

No cluster is reachable here, so `sbatch`/`srun`/`sacct` are local fakes (tests/sweeps/
fake_slurm.py) that run each array task with the environment SLURM would set. Everything else is
real: Hydra composes hydra/launcher=slurm, submitit writes the sbatch script and pickles the job,
the job task starts torchrun (moe_lm/launch/slurm.py), torchrun starts moe_lm.train, and the
result travels back to the sweep.
"""

from __future__ import annotations

import pytest

from moe_lm.launch.job_status import read_status
from moe_lm.reporting.sweep_report import write_report
from tests.conftest import read_metrics
from tests.sweeps import fake_slurm
from tests.sweeps.helpers import multirun_cli, report_row


@pytest.mark.slow
def test_slurm_sweep_job_runs_torchrun_inside_the_job(tmp_path, tiny_overrides):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep, state = tmp_path / "sweep", tmp_path / "slurm"
    state.mkdir()
    env = {**fake_slurm.install(tmp_path / "bin"), "FAKE_SLURM_DIR": str(state),
           "FAKE_SLURM_SWEEP": str(sweep), "MASTER_PORT": "29731"}
    out = multirun_cli(sweep, [
        "hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.account=proj",
        "hydra.launcher.gpus_per_node=1", "hydra.launcher.cpus_per_task=2",
        "hydra.launcher.timeout_min=30", *tiny_overrides, "trainer.max_steps=2"],
        timeout=240, extra_env=env)
    logs = "".join(p.read_text() for p in state.glob("task*.log"))
    assert out.returncode == 0, out.stdout + out.stderr + logs

    script = (state / "submitted.sh").read_text()  # what sbatch received
    for line in ("#SBATCH --partition=debug", "#SBATCH --account=proj", "#SBATCH --nodes=1",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --time=30"):
        assert line in script, script
    assert ("-m torch.distributed.run --nnodes=1 --node_rank=0 --nproc_per_node=1 "
            "--master_addr=localhost --master_port=29731 -m moe_lm.train") in logs

    job = sweep / "0"
    status = read_status(job)
    assert status["status"] == "completed" and status["job_num"] == 0 and status["step"] == 2
    assert status["val_loss"] == [r for r in read_metrics(job) if "val_loss" in r][-1]["val_loss"]
    assert (job / ".hydra" / "config.yaml").is_file()  # written by the torchrun worker (rank 0)
    text, _ = write_report(sweep)
    assert report_row(text, 0)[2:5] == ["completed", "2", f"{status['val_loss']:.4f}"]
