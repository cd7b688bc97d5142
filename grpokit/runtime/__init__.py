"""The process a run lives in: several processes (accelerate / torchrun), the memory allocator, and what the machine
has (`cuda_available`, `run_device`, `cpu_info`, `bf16_unsupported`: for the settings that depend on it,
`load_in_4bit: auto` and `bf16: auto`, without the config importing torch)."""


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU (imports torch: call it only where a config needs the answer)."""
    import torch

    return torch.cuda.is_available()


def run_device(name: str | None) -> str:
    """The device a run computes on: `name` ("cpu", "cuda", "cuda:1", ...) where one is named, else "cuda" where
    torch sees a GPU, else "cpu" (imports torch only when none is named)."""
    return name or ("cuda" if cuda_available() else "cpu")


def cpu_info(field: str) -> str:
    """A field of the first processor in /proc/cpuinfo ("vendor_id", "flags", ...); "" where there is none (another
    OS, or no such field)."""
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            name, _, value = line.partition(":")
            if name.strip() == field:
                return value.strip()
    return ""


# x86 instructions that multiply bf16 natively (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later)
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def bf16_unsupported(device: str | None) -> str | None:
    """Why bf16 autocast would not run on native bf16 hardware on `device` ("cpu", "cuda[:i]"; None: CUDA where
    torch sees a GPU, else the CPU), or None where it would: a CUDA GPU that computes bf16 without emulation
    (compute capability 8.0 and up), or an x86 CPU with avx512_bf16 or AMX under a torch with oneDNN. The GPU is
    the one `device` names, else this process's (LOCAL_RANK under torchrun / accelerate, else 0). Imports torch:
    call it only where a config needs the answer (`bf16: auto`)."""
    import os

    import torch

    kind, _, index = run_device(device).partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        from grpokit.runtime.distributed import world_size

        # the process's GPU: the one `device` names, else LOCAL_RANK's under a launcher (a stray one alone: GPU 0)
        named = index or (os.environ.get("LOCAL_RANK", "0") if world_size() > 1 else "0")
        count = torch.cuda.device_count()
        if not named.isdigit() or int(named) >= count:
            from grpokit.errors import ConfigError

            where = f"device {device}" if index else f"LOCAL_RANK {named}"
            raise ConfigError(f"{where} names CUDA GPU {named}, but this process sees {count} "
                              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); name a "
                              f"visible GPU (cuda:0 to cuda:{count - 1})")
        gpu = int(named)
        with torch.cuda.device(gpu):
            if not torch.cuda.is_bf16_supported(including_emulation=False):
                return f"the GPU ({torch.cuda.get_device_name(gpu)}) has no native bf16"
        return None
    if kind != "cpu":
        return f"device {device} is neither a CUDA GPU nor the CPU"
    flags = set(cpu_info("flags").split())
    if not flags & set(CPU_BF16_FLAGS):
        return "the CPU has no avx512_bf16 or AMX bf16 instructions"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (its CPU bf16 kernels)"
    return None
