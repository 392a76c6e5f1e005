"""Training: the loop, optimizer and schedule, checkpoints, metrics and process-group helpers."""
