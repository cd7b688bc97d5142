"""Training: the GRPO trainer, its state and checkpoints, best-model keeping, SFT, the run harness."""
