"""Training: the Accelerate loop, task mixing, optimizer and schedule, checkpoints, logging."""
