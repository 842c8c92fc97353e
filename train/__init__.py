"""Training: config loading, the sharded loop, tasks, checkpoints and metrics."""
