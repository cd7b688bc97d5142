"""The update of one GRPO step alone: log-probs with autograd, backward, AdamW, on fixed token ids.

A step's update as the trainer runs it on one micro-batch whose every row trains (no silent rows):
`completion_logps` over prompt + completion with autograd (shared prompt forward, chunked LM head), a backward of
a loss over every completion token, and the optimizer step of `grpokit.models.loading.optimizer_and_schedule`. The
token ids are random but fixed (--seed), so float32 and bf16 autocast, or two commits (PYTHONPATH), run the same
products. Prints median and min-max seconds over --repeats after one warm-up, and the GEMM floor's share when
--gemm-gflops (benchmarks/floors.py) is given: 6 x weights x tokens / peak.

Usage: python benchmarks/update.py [--bf16] [--rows 8 --prompt 40 --completion 128] [--repeats 5]
Run it on tcmalloc as `grpokit train` does: LD_PRELOAD=<libtcmalloc_minimal.so.4>.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--rows", type=int, default=8, help="completions (one prompt, G rows)")
    parser.add_argument("--prompt", type=int, default=40)
    parser.add_argument("--completion", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gemm-gflops", type=float, default=None)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from grpokit.config import validate_config
    from grpokit.models.loading import optimizer_and_schedule, resolve_model_path
    from grpokit.models.logprobs import completion_logps

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), dtype=torch.float32).train()
    cfg = validate_config({"model": args.model, "dataset": "arithmetic", "learning_rate": 1e-6, "max_steps": 1000})
    optimizer, _ = optimizer_and_schedule(model, cfg)
    gen = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=gen).expand(args.rows, -1)  # one group
    ids = torch.cat([prompt, torch.randint(0, vocab, (args.rows, args.completion), generator=gen)], dim=1)
    attention = torch.ones_like(ids)
    weights = torch.randn(args.rows, args.completion, generator=gen)

    def update() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logps, _ = completion_logps(model, ids, attention, args.completion, 1.0, cfg.logprob_chunk_size)
        (logps.float() * weights).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    update()
    times = [update() for _ in range(args.repeats)]
    tokens = args.rows * args.completion + args.prompt  # the prompt runs once for its group (shared forward)
    line = (f"update ({'bf16 autocast' if args.bf16 else 'float32'}, {args.rows} x ({args.prompt} + "
            f"{args.completion}) tokens): {statistics.median(times):.2f} s ({min(times):.2f}-{max(times):.2f}) "
            f"over {args.repeats}")
    if args.gemm_gflops:
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        floor = 6 * linear * tokens / (args.gemm_gflops * 1e9)
        line += f"; GEMM floor {floor:.2f} s ({floor / statistics.median(times):.0%} of it)"
    print(line)


if __name__ == "__main__":
    main()
