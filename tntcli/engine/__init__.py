"""Training and evaluation: the loop, checkpoints, distributed helpers. Knows models and data only by their APIs."""
