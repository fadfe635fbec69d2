"""Training stages: each takes a checkpoint and data and returns a checkpoint."""
