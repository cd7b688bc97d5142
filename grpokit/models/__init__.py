"""Models: loading (with LoRA and 4-bit), per-token log-probs, CPU linear kernels."""
