"""The training engine: the accelerate loop, EMA updates and checkpoints."""
