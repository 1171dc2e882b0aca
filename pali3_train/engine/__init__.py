"""Training engine: the step loop, checkpoints and experiment tracking."""
