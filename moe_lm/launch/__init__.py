"""How runs are started and how they end: torchrun inside SLURM jobs, and sweep-job status files.

- `slurm`: from SLURM's environment to this node's torchrun command (`python -m moe_lm.launch`).
- `job_status`: `status.json` in every run directory, and a sweep job's wandb group and name.
"""
