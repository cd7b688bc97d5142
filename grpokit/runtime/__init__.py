"""The process a run lives in: several processes (accelerate / torchrun) and the memory allocator."""
