"""This machine's floors for a GRPO step on a model: what memory and matrix products allow, measured here.

Measures, with the model's own shapes (SmolLM2-135M-Instruct by default):
  read bandwidth     a timed sum over a 1 GiB float32 buffer (median of 5)
  GEMM peak          update-sized products ([tokens x in] x [in x out] for every linear shape of the model, the
                     LM head included, forward-sized), float32 (torch's choice: MKL on Intel) and bf16 (oneDNN),
                     as GFLOP/s over one pass of all the model's products (weights cycling through memory)
  decode pass        one decode step's products for `rows` rows (8: one prompt x G = 8; 64: 8 prompts x 8), on
                     the layouts the sampler uses (float32: torch's linear, and oneDNN's packed weights as
                     `cpu_linear: onednn` has them; bf16: oneDNN packed weights)

and prints the floors the benchmarks compare against:
  decode weight-read floor   weight bytes / read bandwidth (float32 4 bytes, bf16 2 bytes per weight)
  decode product floor       the measured decode pass (the products alone, nothing else)
  update floor               6 x weights x tokens / GEMM peak (forward 2, backward 4 FLOP per weight and token)

Usage: python benchmarks/floors.py [--model PATH] [--tokens 1024] [--rows 8,64] [--json out.json]
Results and the machine they were measured on: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per update-sized product")
    parser.add_argument("--rows", default="8,64", help="decode batch sizes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig

    from grpokit.models.loading import resolve_model_path

    torch.set_num_threads(args.threads)
    config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    layer = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
    shapes = layer * config.num_hidden_layers + [(hidden, config.vocab_size)]
    weights = sum(i * o for i, o in shapes)  # linear weights, LM head included (embeddings are read one row a token)

    buffer = torch.ones(1 << 28)  # 1 GiB float32
    bandwidth = buffer.numel() * 4 / _median_time(buffer.sum, args.repeats)
    buffer = None

    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "threads": args.threads},
              "versions": {"torch": torch.__version__}, "model": args.model, "weights": weights,
              "read_bandwidth_gbs": bandwidth / 1e9, "gemm_gflops": {}, "decode_pass_ms": {}}

    def products(dtype, rows, packed):
        mats = [torch.randn(o, i).to(dtype) for i, o in shapes]
        if packed:
            mats = [torch.ops.mkldnn._reorder_linear_weight(m, rows) for m in mats]
        inputs = {i: torch.randn(rows, i).to(dtype) for i in {i for i, _ in shapes}}
        if packed:
            return lambda: [torch.ops.mkldnn._linear_pointwise(inputs[i], m, None, "none", [], "")
                            for (i, _), m in zip(shapes, mats, strict=True)]
        return lambda: [torch.nn.functional.linear(inputs[i], m) for (i, _), m in zip(shapes, mats, strict=True)]

    for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16)):
        seconds = _median_time(products(dtype, args.tokens, packed=False), args.repeats)
        result["gemm_gflops"][name] = 2 * weights * args.tokens / seconds / 1e9
        for rows in (int(r) for r in args.rows.split(",")):
            packed = name == "bf16"
            result["decode_pass_ms"][f"{name}@{rows}"] = _median_time(products(dtype, rows, packed), args.repeats) * 1e3
            if name == "float32":  # what cpu_linear onednn's packed float32 weights would give
                result["decode_pass_ms"][f"float32-onednn@{rows}"] = _median_time(
                    products(dtype, rows, True), args.repeats) * 1e3

    print(f"machine: {result['machine']}, torch {torch.__version__}; model {args.model}: {weights / 1e6:.1f}M "
          f"linear weights")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("| precision | GEMM peak, GFLOP/s (update-sized) | update floor per 1000 tokens, s "
          "| decode weight-read floor, ms | decode products, ms per step |")
    print("|---|---|---|---|---|")
    for name, size in (("float32", 4), ("bf16", 2)):
        gflops = result["gemm_gflops"][name]
        passes = ", ".join(f"{k.split('@')[1]} rows {v:.1f}{' (oneDNN packed)' if 'onednn' in k else ''}"
                           for k, v in result["decode_pass_ms"].items() if k.split("@")[0] in (name, f"{name}-onednn"))
        print(f"| {name} | {gflops:.0f} | {6 * weights * 1000 / gflops / 1e9:.2f} "
              f"| {weights * size / bandwidth * 1e3:.1f} | {passes} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
