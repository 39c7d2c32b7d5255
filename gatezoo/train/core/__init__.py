"""The core every training command shares: config schema, the training loop, checkpoints, optimiser
and schedules, distributed helpers, run directories and devices, and the model factory."""
