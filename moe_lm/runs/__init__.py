"""Running one training job as `python -m moe_lm.train` does: the Hydra job around the trainer
(`train_job`): status files, sweep naming, torchrun inside SLURM jobs, the launch guard, the run
config, and the dry run or the training run itself."""
