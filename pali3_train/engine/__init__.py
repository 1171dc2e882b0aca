"""Training engine: the step loop and checkpoints (experiment tracking is pali3_train.tracking)."""
