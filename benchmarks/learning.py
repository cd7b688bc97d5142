"""Learning quality: greedy held-out accuracy before and after a GRPO run under a wall-clock budget, over seeds.

Each seed is one `grpokit train CONFIG` run in a fresh subprocess (run it alone on the machine: a test suite
beside it costs it about a third of its steps) with `max_train_seconds` = --budget, `eval_on_start`, and no
checkpoints; the held-out evaluation is the config's (`eval_dataset`, greedy, its accuracy reward). From the
run's evaluations.jsonl (accuracy per held-out prompt) and metrics.jsonl:

- per seed: optimizer steps, accuracy before and after with 95% Wilson intervals, the gain, and the paired
  counts: prompts fixed (wrong before, right after) and broken (right before, wrong after);
- per seed, over time: mean token entropy and the fraction of groups with zero reward spread
  (`frac_reward_zero_std`, over every group sampled), by tenth of the run's steps, and averaged over the second
  half of the steps; beside it the fraction among the groups trained on (they differ with dynamic sampling,
  which drops zero-spread groups and refills);
- over seeds: mean gain, worst gain, seeds that ended below the untrained model, the mean second-half
  zero-spread fraction.

Results go to benchmarks/results/learning-NAME-TIMESTAMP.json, created anew each time (never overwritten), with
the machine, versions, commit and command; the runs' directories to benchmarks/runs/ (not in git).

Usage (from the repository root, with grpokit's venv):
  python benchmarks/learning.py examples/demo.yaml --name demo --seeds 0 1 2 --budget 900 [--set KEY=VALUE ...]
  python benchmarks/learning.py --report benchmarks/results/learning-demo-....json   # the table again
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grpokit.evaluation.stats import wilson_interval  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "benchmarks" / "runs"
TENTHS = 10


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "grpokit"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip())
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "torch_threads":
            torch.get_num_threads(), "commit": commit + (" (grpokit/ modified)" if dirty else "")}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def accuracy_summary(values: list[float | None]) -> dict:
    """Right (value 1), scored (not null) and the Wilson interval of right / scored."""
    scored = [v for v in values if v is not None]
    right = sum(1 for v in scored if v >= 1.0)
    low, high = wilson_interval(right, len(scored)) if scored else (float("nan"), float("nan"))
    return {"accuracy": right / len(scored) if scored else float("nan"), "right": right, "scored": len(scored),
            "ci95": [low, high]}


def by_tenth(values: list[float]) -> list[float | None]:
    """Mean of each tenth of `values` (in step order); None for an empty tenth (runs of fewer than 10 steps)."""
    out = []
    for i in range(TENTHS):
        part = values[len(values) * i // TENTHS:len(values) * (i + 1) // TENTHS]
        out.append(statistics.fmean(part) if part else None)
    return out


def seed_result(run_dir: Path) -> dict:
    """What one finished run gives: accuracy before and after, paired counts, entropy and zero spread over time."""
    evaluations = {e["label"]: e["accuracy"] for e in read_jsonl(run_dir / "evaluations.jsonl")
                   if e.get("split", "eval") == "eval"}  # the held-out evaluations, not the validation ones
    missing = [label for label in ("before training", "after training") if label not in evaluations]
    if missing:
        raise SystemExit(f"{run_dir}/evaluations.jsonl has no evaluation {missing}: the config needs an eval_dataset")
    before, after = evaluations["before training"], evaluations["after training"]
    steps = [m for m in read_jsonl(run_dir / "metrics.jsonl") if "loss" in m]
    entropy = [m["entropy"] for m in steps if m.get("entropy") is not None]
    zero = [m["frac_reward_zero_std"] for m in steps if m.get("frac_reward_zero_std") is not None]
    trained = trained_zero_spread(run_dir, steps)
    half = len(steps) // 2
    pairs = [(b, a) for b, a in zip(before, after, strict=True) if b is not None and a is not None]
    first, last = accuracy_summary(before), accuracy_summary(after)
    return {
        "steps": len(steps), "train_seconds": sum(m.get("step_time", 0.0) for m in steps),
        "before": first, "after": last, "gain_points": 100 * (last["accuracy"] - first["accuracy"]),
        "fixed": sum(1 for b, a in pairs if b < 1.0 <= a), "broken": sum(1 for b, a in pairs if a < 1.0 <= b),
        "entropy_by_tenth": by_tenth(entropy), "zero_spread_by_tenth": by_tenth(zero),
        "entropy_second_half": statistics.fmean(entropy[half:]) if entropy[half:] else None,
        "zero_spread_second_half": statistics.fmean(zero[half:]) if zero[half:] else None,
        "trained_zero_spread_second_half": statistics.fmean(trained[half:]) if trained[half:] else None,
    }


def trained_zero_spread(run_dir: Path, steps: list[dict]) -> list[float]:
    """Per step, the fraction of the groups trained on that had zero reward spread. Without dynamic sampling that is
    `frac_reward_zero_std`; with it, the zero-spread groups that still filled the batch
    (`dynamic_sampling/zero_spread_groups_kept`) over the groups of a generation (the run's config.yaml)."""
    kept = "dynamic_sampling/zero_spread_groups_kept"
    if not any(kept in m for m in steps):
        return [m["frac_reward_zero_std"] for m in steps if m.get("frac_reward_zero_std") is not None]
    from grpokit.config import load_config

    groups = load_config(str(run_dir / "config.yaml")).prompts_per_generation
    return [m[kept] / groups for m in steps if kept in m]


def _mean_of(seeds: dict[str, dict], key: str) -> float | None:
    values = [r[key] for r in seeds.values() if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def summary(seeds: dict[str, dict]) -> dict:
    gains = [r["gain_points"] for r in seeds.values()]
    zero = [r["zero_spread_second_half"] for r in seeds.values() if r["zero_spread_second_half"] is not None]
    return {"mean_gain_points": statistics.fmean(gains), "worst_gain_points": min(gains),
            "best_gain_points": max(gains), "seeds_below_untrained": sum(1 for g in gains if g < 0),
            "mean_zero_spread_second_half": statistics.fmean(zero) if zero else None,
            "mean_trained_zero_spread_second_half": _mean_of(seeds, "trained_zero_spread_second_half"),
            "mean_steps": statistics.fmean(r["steps"] for r in seeds.values())}


def table(result: dict) -> str:
    """The markdown rows RESULTS.md gets."""
    lines = ["| seed | steps | before (95% CI) | after (95% CI) | gain | fixed / broken | entropy 2nd half | "
             "zero-spread 2nd half (sampled / trained) |", "|---|---|---|---|---|---|---|---|"]

    def pct(acc: dict) -> str:
        return f"{100 * acc['accuracy']:.1f}% ({100 * acc['ci95'][0]:.1f}-{100 * acc['ci95'][1]:.1f})"

    def num(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for seed, r in result["seeds"].items():
        lines.append(f"| {seed} | {r['steps']} | {pct(r['before'])} | {pct(r['after'])} | {r['gain_points']:+.1f} | "
                     f"{r['fixed']} / {r['broken']} | {num(r['entropy_second_half'], '.3f')} | "
                     f"{num(r['zero_spread_second_half'], '.0%')} / "
                     f"{num(r.get('trained_zero_spread_second_half'), '.0%')} |")
    s = result["summary"]
    lines.append(f"\nmean gain {s['mean_gain_points']:+.1f} points, worst {s['worst_gain_points']:+.1f}, best "
                 f"{s['best_gain_points']:+.1f}; {s['seeds_below_untrained']} seed(s) below the untrained model; "
                 f"zero-spread groups over the second half {num(s['mean_zero_spread_second_half'], '.0%')} sampled, "
                 f"{num(s.get('mean_trained_zero_spread_second_half'), '.0%')} trained on; "
                 f"{s['mean_steps']:.0f} steps on average")
    return "\n".join(lines)


def check_config(config: str, overrides: list[str]) -> None:
    """Before any run: the config loads, names held-out data (the before/after comparison needs it), and passes the
    trainer's early checks (`grpokit train --dry-run`), so that a bad setting fails in seconds, not after a run."""
    from grpokit.config import load_config
    from grpokit.errors import GrpokitError

    try:
        cfg = load_config(config, overrides)
    except GrpokitError as exc:
        raise SystemExit(f"learning.py: {exc}") from None
    if cfg.eval_dataset is None:
        raise SystemExit(f"learning.py: {config} has no eval_dataset; accuracy before and after needs held-out data "
                         "(set it in the config or with --set eval_dataset=...)")
    sets = [x for o in overrides for x in ("--set", o)]
    dry = subprocess.run([sys.executable, "-m", "grpokit", "train", config, *sets, "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True)
    if dry.returncode != 0:
        raise SystemExit(f"learning.py: grpokit train --dry-run refused the config:\n{dry.stderr.strip()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="a grpokit config with an eval_dataset")
    parser.add_argument("--name", default=None, help="names the results file and the runs (default: the config's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=900.0, help="max_train_seconds of each run (default 900)")
    parser.add_argument("--max-steps", type=int, default=100_000,
                        help="max_steps of each run (default: large, so that the budget ends it; a linear or "
                             "cosine learning-rate schedule runs over max_steps, so give the steps it should span)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run (repeatable), as grpokit train --set")
    parser.add_argument("--report", metavar="FILE", help="print the table of a results file and exit")
    args = parser.parse_args()
    if args.report:
        print(table(json.loads(Path(args.report).read_text())))
        return 0
    if not args.config:
        parser.error("give a config (or --report FILE)")
    if len(set(args.seeds)) != len(args.seeds) or args.budget <= 0:
        parser.error("--seeds must be distinct (each is one run, keyed by its seed) and --budget > 0")
    check_config(args.config, args.overrides)
    name = args.name or Path(args.config).stem
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_file = RESULTS / f"learning-{name}-{stamp}.json"
    runs = RUNS / f"{name}-{stamp}"
    result = {"name": name, "config": args.config, "config_text": Path(args.config).read_text(),
              "budget_seconds": args.budget, "overrides": args.overrides, "seeds": {}, "machine": machine(),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "started": stamp}
    for seed in args.seeds:
        run_dir = runs / f"seed-{seed}"
        sets = [*args.overrides, f"seed={seed}", f"max_train_seconds={args.budget}", f"max_steps={args.max_steps}",
                f"output_dir={run_dir}", "eval_on_start=true", "save_steps=null", "report_to=none"]
        command = [sys.executable, "-m", "grpokit", "train", args.config, *(x for s in sets for x in ("--set", s))]
        print(f"seed {seed}: {' '.join(command[2:])}", flush=True)
        started = time.monotonic()
        runs.mkdir(parents=True, exist_ok=True)
        with open(runs / f"seed-{seed}.log", "w") as log:
            done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise SystemExit(f"seed {seed}: grpokit train exited {done.returncode}; see {runs}/seed-{seed}.log")
        result["seeds"][str(seed)] = {**seed_result(run_dir), "wall_seconds": time.monotonic() - started,
                                      "run_dir": str(run_dir.relative_to(ROOT))}
        result["summary"] = summary(result["seeds"])
        with open(out_file, "w" if out_file.exists() else "x") as f:  # this invocation's own file, seed by seed
            f.write(json.dumps(result, indent=1) + "\n")
        r = result["seeds"][str(seed)]
        print(f"seed {seed}: {r['steps']} steps, {100 * r['before']['accuracy']:.1f}% -> "
              f"{100 * r['after']['accuracy']:.1f}% ({r['gain_points']:+.1f}), fixed {r['fixed']}, broken "
              f"{r['broken']}", flush=True)
    print(table(result))
    print(f"results: {out_file.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
