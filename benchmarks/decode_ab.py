"""The sampler's decode step, before and after a change to grpokit/models/decoder.py, in one process.

Two runs of the same benchmark in separate processes differ by a few percent on a shared VM; a change to the
decode step worth a few percent needs them side by side. This loads grpokit/models/decoder.py as it was at
`--before` (a git revision) beside the working tree's, and times `TorchEngine.generate` with each, alternating
(before, after, after, before, ...). The rest of grpokit is the working tree's for both; where the change also
touched the cache layer (`grpokit.rollout.decode._PreallocatedLayer.append_one`), the "before" runs hide it.

Usage (repository root, grpokit's venv, alone on the machine):
  LD_PRELOAD=libtcmalloc_minimal.so.4 python benchmarks/decode_ab.py --before fae67f0 --prompts 1 --repeats 7
Prints ms per decode position (wall time of a generation / new tokens, every row running to --new-tokens),
median (min-max) and every run, and whether both gave the same completions; and the decode steps alone
(`LeanDecoder.step`, timed around each call: the median step of each generation, then their median).

--stub-products replaces each of MKL's packed products (the fused float32 step's) with a stored result of its
shape: the steps then time everything but the products, which on a shared VM carry most of its memory-bandwidth
noise. Completions are then meaningless (and not compared); use it to measure a change to the step's other work.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision whose grpokit/models/decoder.py is 'before'")
    parser.add_argument("--prompts", type=int, default=1, help="distinct prompts (x --group rows each)")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7, help="timed generations of each")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stub-products", action="store_true",
                        help="replace MKL's packed products with stored results: time the step's other work")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO / "benchmarks"))
    import sampler

    from grpokit.models import cpu_linear
    from grpokit.models import decoder as after
    from grpokit.models.loading import load_policy, resolve_model_path
    from grpokit.rollout import decode, torch_engine
    from grpokit.rollout.base import SamplingParams

    torch.set_num_threads(args.threads)
    source = subprocess.run(["git", "show", f"{args.before}:grpokit/models/decoder.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    before = types.ModuleType("decoder_before")
    exec(compile(source, f"{args.before}:grpokit/models/decoder.py", "exec"), before.__dict__)  # noqa: S102
    append_one = getattr(decode._PreallocatedLayer, "append_one", None)

    steps: list[float] = []

    def timed(step):
        def run(*a, **k):
            start = time.perf_counter()
            out = step(*a, **k)
            steps.append(time.perf_counter() - start)
            return out
        return run

    after_step, before_step = after.LeanDecoder.step, before.LeanDecoder.step
    after.LeanDecoder.step, before.LeanDecoder.step = timed(after_step), timed(before_step)
    if args.stub_products:
        stored: dict[tuple[int, int], torch.Tensor] = {}

        def stub(a, packed, weight, bias, rows):
            key = (a.shape[0], weight.shape[0])
            if key not in stored:
                stored[key] = torch.randn(key) * 0.01
            return stored[key]

        cpu_linear._mkl_product = stub

    def use(which: str) -> None:
        torch_engine.decoder = after if which == "after" else before
        if which == "before" and hasattr(decode._PreallocatedLayer, "append_one"):
            del decode._PreallocatedLayer.append_one
        elif which == "after" and append_one is not None:
            decode._PreallocatedLayer.append_one = append_one

    path = resolve_model_path("smollm2-135m-instruct")
    model = load_policy(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = sampler._prompt_ids(tokenizer, args.prompts)
    cpu_linear.apply(model, "auto", "cpu")
    engine = torch_engine.TorchEngine(model, tokenizer.pad_token_id, cpu_linear="auto")
    params = SamplingParams(max_tokens=args.new_tokens, temperature=1.0, stop_token_ids=[], seed=1)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}; torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; {args.prompts} prompts x G={args.group}, {args.new_tokens} tokens, "
          f"no stop; before: decoder.py at {args.before}, after: the working tree")
    for which in ("before", "after"):  # warm-up: first-call allocations
        use(which)
        engine.generate(prompts, args.group, SamplingParams(max_tokens=16, temperature=1.0, stop_token_ids=[], seed=0))
    times: dict[str, list[float]] = {"before": [], "after": []}
    step_medians: dict[str, list[float]] = {"before": [], "after": []}
    completions = {}
    for r in range(args.repeats):
        for which in ("before", "after") if r % 2 == 0 else ("after", "before"):
            use(which)
            steps.clear()
            started = time.perf_counter()
            completions[which] = engine.generate(prompts, args.group, params).completion_ids
            times[which].append((time.perf_counter() - started) * 1e3 / args.new_tokens)
            step_medians[which].append(statistics.median(steps) * 1e3)
    use("after")
    for which, values in times.items():
        alone = step_medians[which]
        print(f"{which}: {statistics.median(values):.1f} ms per position ({min(values):.1f}-{max(values):.1f}); "
              f"runs {[round(v, 1) for v in values]}; decode steps alone {statistics.median(alone):.2f} ms "
              f"({min(alone):.2f}-{max(alone):.2f})")
    same = "not compared (--stub-products)" if args.stub_products else completions["before"] == completions["after"]
    print(f"load after: {os.getloadavg()}; same completions: {same}")


if __name__ == "__main__":
    main()
