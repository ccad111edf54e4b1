"""Training machinery shared by every job: config schemas, optimizers and schedules, the loop, checkpoints, logs."""
