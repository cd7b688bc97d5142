"""`grpokit plan`'s CPU memory estimate against the measured peak RSS of `grpokit train` on SmolLM2-135M.

For each config, `grpokit train` runs for --steps optimizer steps (default 2; G=8, 2 prompts per generation,
max_completion_length 128, the built-in arithmetic data) in a fresh subprocess, and the child's peak RSS is
read from wait4 (ru_maxrss: the largest process of its tree, reward workers included, not a sum). The estimate is
grpokit.plan's total with its "Python process" line, measured in this process after it has built the model on the
meta device, as `grpokit plan` does. The plan bounds prompts and completions at max_prompt_length /
max_completion_length, so short arithmetic prompts and completions that stop early make the measurement fall below
the estimate; --prompt-length sets max_prompt_length for both (arithmetic prompts fit).

Each config runs twice: with the C allocator as it is, and with MALLOC_MMAP_THRESHOLD_=--mmap-threshold in the
child's environment (0: skip), which makes glibc map tensors above that size on their own and unmap them when freed.
glibc before 2.39 otherwise keeps freed tensor blocks it cannot reuse (grpokit/plan.py, "Not counted"); the second
run shows what the estimate is about once that memory goes back to the system, and at what cost in s/step.

  full       all weights trained (fp32)          full-gc   the same with gradient_checkpointing
  lora       use_peft (r 16, all-linear)         lora-gc   the same with gradient_checkpointing

Usage: python benchmarks/plan_vs_measured.py [--configs full,full-gc,lora,lora-gc] [--steps 2]
       [--prompt-length 128] [--completion-length 128] [--mmap-threshold 1048576] [--set KEY=VALUE ...]
Prints a markdown table: config, estimate MiB, then for each allocator setting the measured MiB, error %
((estimate - measured) / measured) and the last step's s/step. Each config trains the 135M model in its own process:
run it on a quiet machine for the s/step columns (peak RSS does not depend on load).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "full": [],
    "full-gc": ["gradient_checkpointing=true"],
    "lora": ["use_peft=true"],
    "lora-gc": ["use_peft=true", "gradient_checkpointing=true"],
}


def peak_rss_mib(cmd: list[str], log: Path, extra_env: dict[str, str]) -> float:
    """Run `cmd` to completion with `extra_env`; its peak RSS in MiB (wait4 ru_maxrss, KiB on Linux)."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}  # "as is" means as is
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=128, help="max_prompt_length for plan and train")
    parser.add_argument("--completion-length", type=int, default=128, help="max_completion_length")
    parser.add_argument("--mmap-threshold", type=int, default=1 << 20, metavar="BYTES",
                        help="MALLOC_MMAP_THRESHOLD_ of the second run of each config (0: no second run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every config (repeatable)")
    args = parser.parse_args()
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")

    sys.path.insert(0, str(REPO))
    from grpokit import plan
    from grpokit.config import load_config

    common = ["model=smollm2-135m-instruct", "device=cpu", "num_generations=8", "per_device_train_batch_size=16",
              "gradient_accumulation_steps=1", f"max_completion_length={args.completion_length}",
              f"max_prompt_length={args.prompt_length}", f"max_steps={args.steps}", "save_steps=null",
              "report_to=none", "eval_steps=null", "logging_steps=1", *args.overrides]
    shape = plan.model_shape("smollm2-135m-instruct")
    process = plan.process_bytes(load_config(None, common))  # after model_shape, as `grpokit plan` measures it
    settings = {"glibc as is": {}}
    if args.mmap_threshold:
        settings[f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}"] = {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)}
    work = Path(tempfile.mkdtemp(prefix="plan-vs-measured-"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"libc {' '.join(platform.libc_ver())}; Python process line: {process / 2**20:.0f} MiB; logs in {work}\n")
    print("| config | estimate MiB | " + " | ".join(f"{k}: measured MiB | error % | s/step" for k in settings) + " |")
    print("|---|---:|" + "---:|---:|---:|" * len(settings))
    for name in names:
        estimate = plan.estimate(load_config(None, [*common, *CONFIGS[name]]), shape, process).total / 2**20
        cells = []
        for index, extra_env in enumerate(settings.values()):
            overrides = [*common, *CONFIGS[name], f"output_dir={work / name}-{index}"]
            cmd = [sys.executable, "-m", "grpokit", "train"] + [x for o in overrides for x in ("--set", o)]
            log = work / f"{name}-{index}.log"
            measured = peak_rss_mib(cmd, log, extra_env)
            error = 100 * (estimate - measured) / measured
            cells.append(f"{measured:.0f} | {error:+.1f} | {last_step_seconds(log):.1f}")
        print(f"| {name} | {estimate:.0f} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
