"""Data parallelism over several processes, through accelerate (`accelerate launch` or `torchrun`).

Every process holds the whole model and walks the same prompt order (same seed). A generation's
rows (prompts x num_generations completions, prompt-major) are cut into one contiguous share per
process, so a group may straddle two processes. Each process samples and scores its share; the
scored rows are then gathered, so every process holds the whole generation and computes the same
advantages from whole groups. Each optimizer step trains on one window of rows; every process
takes its own part of the window, its loss divided by the window's global normaliser, and
accelerate's DDP averages the gradients (the loss is scaled by the process count to undo the
average), so an optimizer step equals one process training on the whole window.

One process (no launcher): `Processes` is a no-op shell and nothing here touches torch.distributed.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config.py reads world_size(): importing this module must not import torch
    import torch


def world_size() -> int:
    """Processes in the job, from the launcher's environment (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


# what gloo and NCCL say when a collective's peer process has gone (crashed, killed, or stopped on its own error)
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "communicator was aborted",
              "socket timeout", "remote worker crashing")


def peer_lost(exc: BaseException) -> bool:
    """Whether `exc`, raised in a job of several processes, is a collective failing because another process left."""
    if world_size() <= 1:
        return False
    import torch.distributed

    if isinstance(exc, getattr(torch.distributed, "DistNetworkError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(marker in text for marker in _PEER_GONE)


def peer_lost_message(exc: BaseException) -> str:
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip())  # gloo prefixes its source file and line
    reason = re.split(r"(?<=\S)\. ", text.splitlines()[0] if text else type(exc).__name__)[0][:200]
    return (f"process {rank()} of {world_size()} stopped: another process of this job left a collective operation "
            f"({reason}). That process's own error is above (the launcher's summary lists each process's exit "
            "code). The run directory keeps what was written before, checkpoints included: fix that error, then "
            "resume with --resume")


def share(rows: int, count: int, index: int) -> tuple[int, int]:
    """[lo, hi): the contiguous rows process `index` of `count` takes out of `rows` (sizes differ by at most 1)."""
    return rows * index // count, rows * (index + 1) // count


def sample_ranges(lo: int, hi: int, group_size: int) -> tuple[int, list[range]]:
    """Rows [lo, hi) of a prompt-major generation -> (first prompt, the sample indices of each prompt touched)."""
    if hi <= lo:
        return lo // group_size, []
    first, last = lo // group_size, (hi - 1) // group_size
    return first, [range(max(lo - p * group_size, 0), min(hi - p * group_size, group_size))
                   for p in range(first, last + 1)]


def check_strategy(distributed_type: str) -> None:
    """Data parallelism (DDP) only: the sampler generates from whole weights in each process, which FSDP and
    DeepSpeed do not keep (sharded parameters, or an engine that owns the optimizer step)."""
    name = distributed_type.rsplit(".", 1)[-1]
    if name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        from grpokit.errors import ConfigError

        raise ConfigError(f"accelerate's config selects {name}, which grpokit does not support yet: each process "
                          "generates from the whole model, and the training loop steps the optimizer itself. Use "
                          "data parallelism (DDP): `accelerate launch --multi_gpu --num_processes N -m grpokit train "
                          "CONFIG` or `torchrun --nproc_per_node N -m grpokit train CONFIG`, and fit memory with LoRA, "
                          "gradient_checkpointing or bf16 (`grpokit plan CONFIG --memory ...`)")


class Processes:
    """The job's processes. With one, every method is the single-process no-op."""

    def __init__(self, cpu: bool):
        self.count = world_size()
        self.accelerator = None
        self.index = 0
        if self.count > 1:
            from accelerate import Accelerator

            # the loop does its own accumulation and autocast; accelerate only sets up the processes and wraps
            self.accelerator = Accelerator(cpu=cpu)
            check_strategy(str(self.accelerator.distributed_type))
            self.index = self.accelerator.process_index
            self.count = self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def device(self) -> torch.device | None:
        return None if self.accelerator is None else self.accelerator.device

    def prepare(self, module: torch.nn.Module, optimizer):
        """(module wrapped for data parallelism, optimizer) — unchanged with one process."""
        if self.accelerator is None:
            return module, optimizer
        return self.accelerator.prepare(module, optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss * self.count)  # DDP averages gradients; the loss is already a global share

    def no_sync(self, module: torch.nn.Module, skip: bool):
        """Within this context gradients are not all-reduced (every micro-batch of a window but the last)."""
        if self.accelerator is None or not skip:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(module)

    def clip_grad_norm(self, params, max_norm: float) -> float:
        import torch

        if self.accelerator is None:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return float(self.accelerator.clip_grad_norm_(params, max_norm))

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over processes."""
        if self.accelerator is None:
            return values
        return self.accelerator.reduce(values, reduction="sum")

    def gather(self, obj) -> list:
        """Every process's `obj` (any picklable value), in process order."""
        if self.accelerator is None:
            return [obj]
        import torch

        out = [None] * self.count
        torch.distributed.all_gather_object(out, obj)
        return out

    def wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def close(self) -> None:
        import torch

        if self.accelerator is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
