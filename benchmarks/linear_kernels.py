"""float32 linear kernels on CPU: torch's own (MKL sgemm) vs oneDNN (grpokit.models.cpu_linear), in GFLOP/s.

SmolLM2-135M's linear shapes (hidden 576, MLP 1536, vocabulary 49,152) at decode batch sizes (16, 64 rows)
and a training batch (2048 rows): the forward x @ W^T, the input gradient g @ W and the weight gradient
g^T @ x, each as grpokit's OneDNNLinear computes it. Several distinct weights per shape, cycled, so the
weights come from memory as in a model's forward rather than staying in cache. Every figure is the best
of --repeats passes after one warm-up pass.

Usage: python benchmarks/linear_kernels.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

SHAPES = [  # name, out features, in features, weights per pass
    ("q/o proj", 576, 576, 60),
    ("mlp up/gate", 1536, 576, 60),
    ("mlp down", 576, 1536, 30),
    ("lm head", 49152, 576, 1),
]


def best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", default="16,64,2048", help="comma-separated batch sizes (rows of x)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from grpokit.models import cpu_linear

    if not cpu_linear.onednn_available():
        raise SystemExit("this torch build cannot run oneDNN's linear op")
    matmul = cpu_linear._matmul  # the op OneDNNLinear's forward and backward call
    print(f"# {platform.machine()}, CPU vendor {cpu_linear.cpu_vendor() or 'unknown'}, {os.cpu_count()} CPUs, "
          f"{args.threads} threads, torch {torch.__version__}; GFLOP/s, best of {args.repeats}")
    print("| rows | shape (out x in) | forward: torch / oneDNN | input grad: torch / oneDNN "
          "| weight grad: torch / oneDNN |")
    print("|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for rows in (int(r) for r in args.rows.split(",")):
        for name, out_f, in_f, count in SHAPES:
            if rows > 64 and name == "lm head":
                count = 1
            weights = [torch.randn(out_f, in_f, generator=gen) for _ in range(count if rows <= 64 else min(count, 4))]
            x = torch.randn(rows, in_f, generator=gen)
            grad = torch.randn(rows, out_f, generator=gen)
            flops = 2 * rows * out_f * in_f * len(weights) / 1e9
            cells = []
            for torch_fn, onednn_fn in (
                (lambda: [torch.nn.functional.linear(x, w) for w in weights],
                 lambda: [matmul(x, w) for w in weights]),
                (lambda: [grad @ w for w in weights],
                 lambda: [matmul(grad, w.t()) for w in weights]),
                (lambda: [grad.t() @ x for _ in weights],
                 lambda: [matmul(grad.t(), x.t()) for _ in weights]),
            ):
                cells.append(f"{flops / best_seconds(torch_fn, args.repeats):.0f} / "
                             f"{flops / best_seconds(onednn_fn, args.repeats):.0f}")
            print(f"| {rows} | {name} ({out_f} x {in_f}) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
