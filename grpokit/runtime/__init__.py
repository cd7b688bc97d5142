"""The process a run lives in: several processes (accelerate / torchrun), the memory allocator, and what the machine
has (`cuda_available`, for settings that depend on it, such as `load_in_4bit: auto`, without the config importing
torch)."""


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU (imports torch: call it only where a config needs the answer)."""
    import torch

    return torch.cuda.is_available()
