"""Training and evaluation: the Trainer, tasks, optimizer and schedule, checkpoints, distributed helpers, metrics."""
