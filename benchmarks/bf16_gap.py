"""How far the bf16 sampler's log-probs and entropies are from the trainer's, on a real model.

Generates under bf16 autocast with `TorchEngine` (on CPUs where oneDNN has bf16: the lean bf16 decoder, weights
packed once, bf16 KV cache and attention scores), then recomputes the same completions with the trainer's
`completion_logps`, under bf16 autocast and in float32. Prints, over every completion token, the mean, 99th
percentile and largest |difference| of each pair, the mean difference, and the ratio exp(trainer - sampler): what
an update would take for its importance ratio if it used the sampler's log-probs as the old policy's. grpokit's
update does not (where the policy has not moved since sampling, its old log-probs are its own recompute), so the
sampler's rounding reaches the metrics only: the silent rows' entropy. The tests hold the same comparison on a tiny
random model, whose near-uniform distributions hide how bf16 rounding moves a trained model's.

oneDNN computes bf16 products with float32 accumulation on any CPU it supports bf16 on; without avx512_bf16 or AMX
it emulates them, slower but rounded alike.

Usage: python benchmarks/bf16_gap.py [--model smollm2-135m-instruct] [--group 4] [--tokens 48] [--seed 0]
Results and the machine they were measured on: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import time

QUESTIONS = ["What is 17 * 23? Explain step by step.", "Write a short poem about the sea.",
             "What is 48 + 75 + 12?", "Name three prime numbers above 50."]


def _row(name: str, diff) -> str:
    a = diff.abs()
    return (f"| {name} | {a.mean():.4f} | {a.quantile(0.99):.4f} | {a.max():.4f} | {diff.mean():+.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--group", type=int, default=4, help="completions per prompt (4 prompts)")
    parser.add_argument("--tokens", type=int, default=48, help="max new tokens (EOS stops a row)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from grpokit.algo.batches import pack
    from grpokit.data.loading import tokenise_prompts
    from grpokit.models.loading import load_policy, resolve_model_path
    from grpokit.models.logprobs import completion_logps
    from grpokit.rollout.base import SamplingParams
    from grpokit.rollout.torch_engine import TorchEngine, lean_mode

    torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    model = load_policy(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    records = [{"prompt": [{"role": "user", "content": q}]} for q in QUESTIONS]
    prompts = tokenise_prompts(records, tokenizer, None, "bf16_gap questions").prompt_ids
    stops = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    params = SamplingParams(max_tokens=args.tokens, temperature=args.temperature, top_p=1.0, top_k=0,
                            stop_token_ids=stops, seed=args.seed, entropies=True)
    print(f"machine: {platform.machine()}, torch {torch.__version__}, oneDNN bf16: "
          f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}; model {args.model}; {len(prompts)} prompts x "
          f"G={args.group}, up to {args.tokens} tokens, T={args.temperature}, seed {args.seed}")
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        path_taken = lean_mode(model)
        rollout = TorchEngine(model, tokenizer.pad_token_id).generate(prompts, args.group, params)
    decoder = f"lean {path_taken}" if path_taken else "model's own"
    print(f"bf16 generation: {time.perf_counter() - start:.1f} s on the {decoder} decoder")

    rows = [p for p in prompts for _ in range(args.group)]
    input_ids, attention, cmask = pack(rows, rollout.completion_ids, tokenizer.pad_token_id, "cpu")
    width = cmask.shape[1]
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps_bf16, entropy_bf16 = completion_logps(model, input_ids, attention, width, args.temperature)
        logps_fp32, entropy_fp32 = completion_logps(model, input_ids, attention, width, args.temperature)
    sampled_logps = torch.zeros(len(rows), width, dtype=torch.float64)
    sampled_entropy = torch.zeros(len(rows), width, dtype=torch.float64)
    for i, (logps, entropies) in enumerate(zip(rollout.sampler_logps, rollout.sampler_entropies, strict=True)):
        sampled_logps[i, :len(logps)] = torch.tensor(logps, dtype=torch.float64)
        sampled_entropy[i, :len(entropies)] = torch.tensor(entropies, dtype=torch.float64)
    real = cmask.bool()
    print(f"{int(real.sum())} completion tokens\n")
    print("| pair | mean abs | p99 abs | max abs | mean (first - second) |\n|---|---|---|---|---|")
    pairs = {"log-prob: sampler bf16 - trainer bf16": (sampled_logps, logps_bf16),
             "log-prob: sampler bf16 - trainer float32": (sampled_logps, logps_fp32),
             "log-prob: trainer bf16 - trainer float32": (logps_bf16, logps_fp32),
             "entropy: sampler bf16 - trainer bf16": (sampled_entropy, entropy_bf16),
             "entropy: sampler bf16 - trainer float32": (sampled_entropy, entropy_fp32),
             "entropy: trainer bf16 - trainer float32": (entropy_bf16, entropy_fp32)}
    for name, (first, second) in pairs.items():
        print(_row(name, (first.double() - second.double())[real]))
    ratio = torch.exp(logps_bf16.double() - sampled_logps)[real]
    outside = ((ratio < 0.8) | (ratio > 1.28)).double().mean()
    print(f"\nexp(trainer bf16 - sampler bf16): {ratio.min():.3f}-{ratio.max():.3f}, "
          f"{outside:.2%} of tokens outside [0.8, 1.28]; mean entropy float32 {entropy_fp32[real].mean():.4f}")


if __name__ == "__main__":
    main()
