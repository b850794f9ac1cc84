"""Pieces every training script shares: errors, runtime (device, dtype, seeding, DDP),
log-probs, schedule, logging, arguments, checkpoints."""
