"""The update's time with and without the backward pass of silent rows (advantage exactly 0, a zero-spread group).

One generation of a config (default: the demo's, examples/demo.yaml: SmolLM2-135M-Instruct, 2 prompts x 8,
48 tokens, bf16), then the same optimizer step timed with `Updater.skip_silent_rows` on and off, alternated, after
one warm-up each, with the advantages of 0, 1 or 2 of its groups set to 0 (the zero-spread fraction 0, 0.5, 1).
The math is the same either way (tests/integration/test_algorithm.py holds it to 1e-10 in float64); only the time
differs. Run it alone on the machine.

Usage (from the repository root, with grpokit's venv):
  python benchmarks/silent_rows.py [--config examples/demo.yaml] [--repeats 5] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _relative(path: str) -> str:
    """`path` relative to the repository when it lies inside it (no machine's paths in the results)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "examples" / "demo.yaml"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    import torch
    import transformers

    from grpokit.config import load_config
    from grpokit.train.trainer import Trainer

    out = tempfile.mkdtemp(prefix="silent-rows-")
    cfg = load_config(args.config, [*args.set, f"output_dir={out}", "eval_on_start=false", "report_to=none"])
    trainer = Trainer(cfg)
    pending = trainer.next_generation()
    window = pending.micro_batches[:cfg.gradient_accumulation_steps]
    g = cfg.num_generations
    original = [mb.advantages.clone() for mb in window]
    groups = sum(len(a) for a in original) // g
    rows = []
    for silent_groups in range(groups + 1):
        flat = torch.cat(original).clone()
        flat[:silent_groups * g] = 0  # the first groups lose their spread
        silent_rows = int((flat == 0).sum())  # a group of the generation may have had no spread already
        start = 0
        for mb in window:
            mb.advantages = flat[start:start + len(mb.advantages)].clone()
            start += len(mb.advantages)
        times: dict[bool, list[float]] = {True: [], False: []}
        for i in range(args.repeats + 1):
            for skip in (True, False):
                trainer.updater._skip_silent_rows = skip
                began = time.perf_counter()
                trainer.updater.update(window)
                if i:  # the first round warms up
                    times[skip].append(time.perf_counter() - began)
        row = {"silent_groups": silent_groups, "groups": groups, "silent_rows": silent_rows, "rows": len(flat),
               **{("skip" if skip else "full"): {"median": statistics.median(t), "min": min(t), "max": max(t)}
                  for skip, t in times.items()}}
        row["ratio"] = row["skip"]["median"] / row["full"]["median"]
        rows.append(row)
        print(f"{silent_rows}/{len(flat)} rows silent: full {row['full']['median']:.2f} s "
              f"({row['full']['min']:.2f}-{row['full']['max']:.2f}), skipping silent rows "
              f"{row['skip']['median']:.2f} s ({row['skip']['min']:.2f}-{row['skip']['max']:.2f}), "
              f"ratio {row['ratio']:.2f}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lengths = [int(mb.completion_mask.sum()) for mb in window]
    machine = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
               "torch": torch.__version__, "transformers": transformers.__version__,
               "threads": torch.get_num_threads(), "commit": commit}
    print(json.dumps({"machine": machine,
                      "config": _relative(args.config), "overrides": args.set, "repeats": args.repeats,
                      "completion_tokens": lengths, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
