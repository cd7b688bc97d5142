"""`grpokit plan`'s CPU memory estimate against the measured peak RSS of `grpokit train` on SmolLM2-135M.

For each config, `grpokit train` runs for --steps optimizer steps (default 2; G=8, 2 prompts per generation,
max_completion_length 128, the built-in arithmetic data) in a fresh subprocess, and the child's peak RSS is
read from wait4 (ru_maxrss: the largest process of its tree, reward workers included, not a sum). The estimate is
grpokit.plan's total plus a baseline: the peak RSS of a child that imports torch, transformers and grpokit's
trainer and loads nothing (measured on the same machine, each run). The plan bounds prompts and completions at
max_prompt_length / max_completion_length, so short arithmetic prompts and completions that stop early make the
measurement fall below the estimate; --prompt-length sets max_prompt_length for both (arithmetic prompts fit).

  full       all weights trained (fp32)          full-gc   the same with gradient_checkpointing
  lora       use_peft (r 16, all-linear)         lora-gc   the same with gradient_checkpointing

Usage: python benchmarks/plan_vs_measured.py [--configs full,full-gc,lora,lora-gc] [--steps 2]
       [--prompt-length 128] [--completion-length 128] [--set KEY=VALUE ...]
Prints a markdown table: config, estimate MiB, measured MiB, error % ((estimate - measured) / measured).
Run it on a quiet machine: each config trains the 135M model in its own process.
"""

from __future__ import annotations

import argparse
import os
import platform
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
BASELINE = "import torch, transformers, grpokit.trainer, grpokit.plan"


def peak_rss_mib(cmd: list[str], log: Path) -> float:
    """Run `cmd` to completion; its peak RSS in MiB (wait4 ru_maxrss, KiB on Linux)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; log: {log}\n{log.read_text()[-3000:]}")
    return usage.ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=128, help="max_prompt_length for plan and train")
    parser.add_argument("--completion-length", type=int, default=128, help="max_completion_length")
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
    work = Path(tempfile.mkdtemp(prefix="plan-vs-measured-"))
    baseline = peak_rss_mib([sys.executable, "-c", BASELINE], work / "baseline.log")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"baseline RSS (imports only): {baseline:.0f} MiB; logs in {work}\n")
    print("| config | estimate MiB | measured MiB | error % |")
    print("|---|---:|---:|---:|")
    for name in names:
        overrides = [*common, *CONFIGS[name], f"output_dir={work / name}"]
        cfg = load_config(None, overrides)
        estimate = plan.estimate(cfg, shape).total / 2**20 + baseline
        cmd = [sys.executable, "-m", "grpokit", "train"] + [x for o in overrides for x in ("--set", o)]
        measured = peak_rss_mib(cmd, work / f"{name}.log")
        print(f"| {name} | {estimate:.0f} | {measured:.0f} | {100 * (estimate - measured) / measured:+.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
