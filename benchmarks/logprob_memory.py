"""Peak memory and time of one GRPO update step on SmolLM2-135M: chunked log-probs vs full logits,
and a shared prompt forward vs whole rows when completions come in groups of one prompt.

Each measurement runs in a fresh subprocess: load the model, reset the process's peak-RSS mark
(/proc/self/clear_refs), run forward + loss + backward for B completions, read the peak (VmHWM).
Variants alternate so drift on the machine hits both alike.

  chunked  grpokit's path: decoder once, LM head + log-softmax per chunk, checkpointed
           (with --group G > 1: each distinct prompt runs once, its KV cache indexed out to its rows)
  rows     the same, every row run whole (share_prompt_forward: false)
  full     the completion positions' logits materialised at once ([B, T, V] float32), as TRL does
           with logits_to_keep, then log-softmax and gather

Usage: python benchmarks/logprob_memory.py [--batch 16 --prompt 48 --completion 256 --repeats 3]
       [--group G] [--variants chunked,rows,full] [--gradient-checkpointing] [--bf16]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(variant: str, batch: int, prompt: int, completion: int, chunk: int, bf16: bool, checkpointing: bool,
            group: int = 1, linear: str = "auto") -> dict:
    import torch

    from grpokit.algo.loss import LossSettings, StepTotals, grpo_loss
    from grpokit.models import cpu_linear
    from grpokit.models.loading import load_policy, resolve_model_path
    from grpokit.models.logprobs import completion_logps, positions_from_mask

    torch.manual_seed(0)
    model = load_policy(resolve_model_path("smollm2-135m-instruct"))
    cpu_linear.apply(model, linear, "cpu")  # as a grpokit run on this machine (auto) unless --cpu-linear says
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    input_ids = torch.randint(0, model.config.vocab_size, (batch, prompt + completion))
    input_ids[:, :prompt] = input_ids[::group, :prompt].repeat_interleave(group, dim=0)[:batch]  # groups share a prompt
    attention = torch.ones_like(input_ids)
    advantages = torch.randn(batch)
    mask = torch.ones(batch, completion)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark to the current RSS
    baseline = _rss_kib("VmRSS")
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if variant in ("chunked", "rows"):
            logps, _ = completion_logps(model, input_ids, attention, completion, 1.0, chunk,
                                        share_prompts=variant == "chunked")
        else:
            logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions_from_mask(attention),
                           logits_to_keep=completion + 1, use_cache=False).logits[:, :-1]  # [B, T, V]
            logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, input_ids[:, -completion:, None]).squeeze(-1)
    loss, _ = grpo_loss(logps, logps.detach(), None, advantages, mask, LossSettings(),
                        StepTotals(num_sequences=batch, num_tokens=batch * completion))
    loss.backward()
    elapsed = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    return {"variant": variant, "peak_rss_mib": peak / 1024, "step_peak_over_baseline_mib": (peak - baseline) / 1024,
            "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=48)
    parser.add_argument("--completion", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--group", type=int, default=1, help="completions per prompt (rows i*G..i*G+G-1 share one)")
    parser.add_argument("--variants", default="chunked,full", help="comma-separated: chunked, rows, full")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-linear", default="auto", choices=["auto", "onednn", "torch"],
                        help="grpokit's cpu_linear setting, for every variant")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.batch, args.prompt, args.completion, args.chunk, args.bf16,
                                 args.gradient_checkpointing, args.group, args.cpu_linear)))
        return
    import torch
    import transformers

    shape = ["--batch", str(args.batch), "--prompt", str(args.prompt), "--completion", str(args.completion),
             "--chunk", str(args.chunk), "--group", str(args.group), "--cpu-linear", args.cpu_linear] + \
        (["--bf16"] if args.bf16 else []) + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
    runs: dict[str, list[dict]] = {name: [] for name in args.variants.split(",")}
    for _ in range(args.repeats):
        for variant in runs:
            out = subprocess.run([sys.executable, __file__, "--child", variant, *shape], capture_output=True, text=True,
                                 check=True)
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, python "
          f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"# B={args.batch} completions in groups of {args.group}, "
          f"prompt {args.prompt} + completion {args.completion} tokens, "
          f"chunk {args.chunk}, {'bf16 autocast' if args.bf16 else 'fp32'}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, cpu_linear {args.cpu_linear}, {args.repeats} runs each")
    print("| variant | step peak over baseline, MiB: median (min-max) | process peak RSS, MiB "
          "| seconds: median (min-max) |")
    print("|---|---|---|---|")
    for variant, rs in runs.items():
        over = [r["step_peak_over_baseline_mib"] for r in rs]
        peak = [r["peak_rss_mib"] for r in rs]
        secs = [r["seconds"] for r in rs]
        print(f"| {variant} | {statistics.median(over):.0f} ({min(over):.0f}-{max(over):.0f}) | "
              f"{statistics.median(peak):.0f} | {statistics.median(secs):.1f} ({min(secs):.1f}-{max(secs):.1f}) |")


if __name__ == "__main__":
    main()
