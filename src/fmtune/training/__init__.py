"""Training: one loop core (precision, optimizer groups, early stopping, best weights, checkpoints) and the speed levers (bf16 copy, fast dropout, fused step, threads, distributed)."""
