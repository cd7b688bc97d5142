"""`grpokit plan`'s CPU memory estimate against the measured peak RSS of `grpokit train` on SmolLM2-135M.

For each config, `grpokit train` runs for --steps optimizer steps (default 2; G=8, 2 prompts per generation,
max_completion_length 128, the built-in arithmetic data, a length reward so that every group trains) in a fresh
subprocess, and the child's peak RSS is read from wait4 (ru_maxrss: the largest process of its tree, reward workers
included, not a sum). The estimate is grpokit.evaluation.plan's total with its "Python process" line, measured in
this process after it has built the model on the meta device, as `grpokit plan` does. The plan bounds prompts and
completions at max_prompt_length / max_completion_length, so short arithmetic prompts and completions that stop
early make the measurement fall below the estimate; --prompt-length sets max_prompt_length for both (arithmetic
prompts fit).

Each config runs under each --allocators setting, --repeats times, the settings alternating:
  auto      `grpokit train` as users start it: it restarts itself on tcmalloc where glibc < 2.39 would keep freed
            tensor blocks and tcmalloc is installed (grpokit/runtime/allocator.py)
  system    GRPOKIT_ALLOCATOR=system: glibc's malloc as is (before 2.39 it holds freed blocks it cannot reuse)
  mmap      system with MALLOC_MMAP_THRESHOLD_=1048576: glibc maps tensors over 1 MiB alone and unmaps them when freed
  jemalloc  GRPOKIT_ALLOCATOR=jemalloc
The allocator a run used is read from its summary ("C allocator: ...").

  full       all weights trained (fp32)          full-gc   the same with gradient_checkpointing
  lora       use_peft (r 16, all-linear)         lora-gc   the same with gradient_checkpointing

Usage: python benchmarks/plan_vs_measured.py [--configs full,full-gc,lora,lora-gc] [--steps 2]
       [--allocators auto,system] [--repeats 1] [--prompt-length 128] [--completion-length 128] [--set KEY=VALUE ...]
Prints a markdown table: config, estimate MiB, then for each allocator setting the allocator used, the measured MiB
(median, min-max over repeats), error % ((estimate - measured) / measured, of the median) and the last step's s/step
(median, min-max). Each config trains the 135M model in its own process:
run it on a quiet machine for the s/step columns (peak RSS does not depend on load).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "GRPOKIT_ALLOCATOR", "LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_CONF")
ALLOCATORS = {
    "auto": {},
    "system": {"GRPOKIT_ALLOCATOR": "system"},
    "mmap": {"GRPOKIT_ALLOCATOR": "system", "MALLOC_MMAP_THRESHOLD_": "1048576"},
    "jemalloc": {"GRPOKIT_ALLOCATOR": "jemalloc"},
}
CONFIGS = {
    "full": [],
    "full-gc": ["gradient_checkpointing=true"],
    "lora": ["use_peft=true"],
    "lora-gc": ["use_peft=true", "gradient_checkpointing=true"],
}


def peak_rss_mib(cmd: list[str], log: Path, extra_env: dict[str, str]) -> float:
    """Run `cmd` to completion with `extra_env`; its peak RSS in MiB (wait4 ru_maxrss, KiB on Linux)."""
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}  # each setting says all of its own
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra_env})
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; log: {log}\n{log.read_text()[-3000:]}")
    return usage.ru_maxrss / 1024


def last_step_seconds(log: Path) -> float:
    """The `s/step` the training log prints for the last step (the first one also warms up)."""
    return float(re.findall(r"s/step ([0-9.]+)", log.read_text())[-1])


def _spread(values, fmt: str) -> str:
    """The median, and the min-max when there are several."""
    text = format(statistics.median(values), fmt)
    return text if len(values) == 1 else f"{text} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=128, help="max_prompt_length for plan and train")
    parser.add_argument("--completion-length", type=int, default=128, help="max_completion_length")
    parser.add_argument("--allocators", default="auto,system", help=f"comma-separated, from {', '.join(ALLOCATORS)}")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each config and allocator, alternating")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every config (repeatable)")
    args = parser.parse_args()
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    allocators = [a.strip() for a in args.allocators.split(",") if a.strip()]
    if [a for a in allocators if a not in ALLOCATORS]:
        parser.error(f"unknown allocator(s) in {allocators}; choose from {', '.join(ALLOCATORS)}")

    sys.path.insert(0, str(REPO))
    from grpokit.config import load_config
    from grpokit.evaluation import plan

    common = ["model=smollm2-135m-instruct", "device=cpu", "num_generations=8", "per_device_train_batch_size=16",
              "gradient_accumulation_steps=1", f"max_completion_length={args.completion_length}",
              f"max_prompt_length={args.prompt_length}", f"max_steps={args.steps}", "save_steps=null",
              "report_to=none", "eval_steps=null", "logging_steps=1",
              # a reward with spread in every group: rows whose group has none skip their backward, and the
              # update's activations (most of the estimate) would go unmeasured
              "reward_funcs=[{func: length, args: {target: 64}}]", *args.overrides]
    shape = plan.model_shape("smollm2-135m-instruct")
    process = plan.process_bytes(load_config(None, common))  # after model_shape, as `grpokit plan` measures it
    work = Path(tempfile.mkdtemp(prefix="plan-vs-measured-"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"libc {' '.join(platform.libc_ver())}; Python process line: {process / 2**20:.0f} MiB; "
          f"{args.repeats} run(s) each; logs in {work}\n")
    print("| config | estimate MiB | " + " | ".join(f"{a}: allocator | measured MiB | error % | s/step"
                                                   for a in allocators) + " |")
    print("|---|---:|" + "---|---:|---:|---:|" * len(allocators))
    for name in names:
        estimate = plan.estimate(load_config(None, [*common, *CONFIGS[name]]), shape, process).total / 2**20
        runs = {a: [] for a in allocators}
        for repeat in range(args.repeats):
            for allocator in allocators:
                overrides = [*common, *CONFIGS[name], f"output_dir={work / name}-{allocator}-{repeat}"]
                cmd = [sys.executable, "-m", "grpokit", "train"] + [x for o in overrides for x in ("--set", o)]
                log = work / f"{name}-{allocator}-{repeat}.log"
                measured = peak_rss_mib(cmd, log, ALLOCATORS[allocator])
                used = re.search(r"^C allocator: (\S+(?: [0-9.]+)?)", log.read_text(), re.M)
                runs[allocator].append((measured, last_step_seconds(log), used.group(1) if used else "?"))
        cells = []
        for allocator in allocators:
            rss, seconds, used = zip(*runs[allocator], strict=True)
            error = 100 * (estimate - statistics.median(rss)) / statistics.median(rss)
            cells.append(f"{'/'.join(sorted(set(used)))} | {_spread(rss, '.0f')} | {error:+.1f} | "
                         f"{_spread(seconds, '.1f')}")
        print(f"| {name} | {estimate:.0f} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
