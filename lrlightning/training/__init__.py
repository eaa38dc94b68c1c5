"""Training with low-rank projection: the Lightning callback and the projector it drives, their schedule,
forward passes, divergence guard, distributed sharing and distillation."""
