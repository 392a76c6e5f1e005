"""What runs and sweeps look like afterwards: the sweep report (`sweep_report`) and the wandb
workspace as code (`dashboard`)."""
