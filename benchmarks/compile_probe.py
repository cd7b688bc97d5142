"""Probe: what torch.compile gives a bf16 decode on this CPU, for comparison with grpokit's lean bf16 sampler.

transformers' `generate` with a static cache on SmolLM2-135M-Instruct in bf16 weights, one prompt x --rows samples,
--new-tokens tokens with no stop (min_new_tokens), temperature 1: eager, `torch.compile(model.forward)`, or compiled
with inductor's freezing (weights packed at compile time). Prints the first call's time (compilation included) and
the ms per decode position (min of 3 calls / --new-tokens). grpokit's own figure for the same batch:
`python benchmarks/sampler.py --prompts 1 --no-stop --variants grpokit-bf16 --floor`.

The lean modes time grpokit's own bf16 decode step (`grpokit.models.decoder.LeanDecoder`) on the same prompt, one
step at a time after the prompt's prefill, greedy, --new-tokens steps (median ms per step):
  lean-eager     `LeanDecoder._step_bf16` as the sampler runs it (cache grown 32 positions at a time)
  lean-compiled  the same layers written as one function of tensors (the step's position a tensor, the cache
                 allocated for every step up front, oneDNN's packed-weight product wrapped as an opaque custom
                 op so that inductor keeps it), `torch.compile(dynamic=True)` with inductor's C++ wrapper
Set TORCHINDUCTOR_CACHE_DIR to an empty folder to time a cold compilation.

Usage: python benchmarks/compile_probe.py {eager,compiled,frozen,lean-eager,lean-compiled}
       [--rows 8 --new-tokens 64 --threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["eager", "compiled", "frozen", "lean-eager", "lean-compiled"])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.mode.startswith("lean"):
        return lean(args)
    import transformers
    from transformers import AutoTokenizer, GenerationConfig

    from grpokit.models.loading import load_policy, resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    model = load_policy(path).eval().to(torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 17 * 23? Explain step by step."}],
                                        add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, num_return_sequences=args.rows,
                              cache_implementation="static", pad_token_id=tokenizer.pad_token_id)
    if args.mode != "eager":
        if args.mode == "frozen":
            import torch._inductor.config as inductor

            inductor.freezing = True
        model.forward = torch.compile(model.forward, dynamic=False)

    def run() -> float:
        torch.manual_seed(0)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**ids, generation_config=config)
        return time.perf_counter() - start

    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, threads {torch.get_num_threads()}; {args.rows} rows x {args.new_tokens} tokens")
    first = run()
    walls = [run() for _ in range(3)]
    print(f"{args.mode}: first call {first:.1f} s (compilation included); then {[round(w, 2) for w in walls]} s -> "
          f"{min(walls) / args.new_tokens * 1e3:.1f} ms per decode position (min of 3)")


def lean(args) -> None:
    import transformers
    from transformers import AutoTokenizer

    from grpokit.models import decoder
    from grpokit.models.loading import load_policy, resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    model = load_policy(path).eval()  # float32 weights: the lean bf16 path packs its own bf16 copies
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 17 * 23? Explain step by step."}],
                                        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    rows, width, steps = args.rows, len(ids), args.new_tokens

    @torch.library.custom_op("grpokit_probe::onednn_linear", mutates_args=())
    def onednn_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    @onednn_linear.register_fake
    def _(x, packed, out_features):
        return x.new_empty((x.shape[0], out_features))

    def layers(h, cos, sin, pos, keys, values, masked, weights, sizes, norms, scale, heads, kv_heads, dim):
        """LeanDecoder._step_bf16's layers as a function of tensors; weights[4 i : 4 i + 4]: layer i's packed
        qkv / o / gate-up / down products, sizes their output widths, norms the RMSNorm weights and epsilons."""
        n, split, groups = h.shape[0], (heads + kv_heads) * dim, heads // kv_heads

        def norm(x, k):
            weight, eps = norms[k]
            return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

        for i in range(len(keys)):
            qkv = onednn_linear(norm(h, 2 * i).to(torch.bfloat16), weights[4 * i], sizes[4 * i])
            qk = decoder._rotate_fast(qkv[:, :split].view(n, heads + kv_heads, dim).float(), cos, sin)
            keys[i].index_copy_(2, pos, qk[:, heads:, None].to(torch.bfloat16))
            values[i].index_copy_(2, pos, qkv[:, split:].view(n, kv_heads, 1, dim))
            q = (qk[:, :heads] * scale).to(torch.bfloat16)
            capacity = keys[i].shape[2]
            scores = torch.bmm(q.reshape(n * kv_heads, groups, dim),
                               keys[i].view(n * kv_heads, capacity, dim).transpose(1, 2))
            scores = scores.view(n, kv_heads, groups, capacity).masked_fill(masked, float("-inf"))
            weights_ = scores.softmax(dim=-1, dtype=torch.float32).to(torch.bfloat16)
            out = torch.bmm(weights_.view(n * kv_heads, groups, capacity), values[i].view(n * kv_heads, capacity, dim))
            h = h + onednn_linear(out.view(n, -1), weights[4 * i + 1], sizes[4 * i + 1])
            gate_up = onednn_linear(norm(h, 2 * i + 1).to(torch.bfloat16), weights[4 * i + 2], sizes[4 * i + 2])
            half = gate_up.shape[-1] // 2
            h = h + onednn_linear(torch.nn.functional.silu(gate_up[:, :half]) * gate_up[:, half:],
                                  weights[4 * i + 3], sizes[4 * i + 3])
        return onednn_linear(norm(h, 2 * len(keys)).to(torch.bfloat16), weights[-1], sizes[-1]).float()

    compiled = None
    if args.mode == "lean-compiled":
        import torch._inductor.config as inductor

        inductor.cpp_wrapper = True
        compiled = torch.compile(layers, dynamic=True)
    walls, first = [], None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lean_decoder = decoder.LeanDecoder(model, bf16=True, rows=rows)
        base = lean_decoder.base
        input_ids = torch.tensor([ids] * rows)
        if compiled is not None:  # the cache holds every step from the start: no growth, no shape change
            decoder.BF16Cache.CHUNK = steps + 1
        logits, cache = lean_decoder.prefill(input_ids, torch.ones_like(input_ids),
                                             torch.arange(width)[None].expand(rows, -1))
        weights = [w for packed in lean_decoder.fused for w, _ in packed] + [lean_decoder.head[0]]
        sizes = [w.shape[0] for w in weights]  # each product's output width
        norms = [(m.weight, m.variance_epsilon) for layer in lean_decoder.layers
                 for m in (layer.input_layernorm, layer.post_attention_layernorm)] + [
            (base.norm.weight, base.norm.variance_epsilon)]
        token = logits.argmax(-1)
        greedy = []
        for step in range(steps):
            start = time.perf_counter()
            h = base.embed_tokens(token)
            cos, sin = base.rotary_emb(h, torch.full((rows, 1), width + step))
            if compiled is None:
                logits = lean_decoder._step_bf16(h, cos, sin, cache)
            else:
                pos = torch.tensor([cache.advance()])
                logits = compiled(h, cos, sin, pos, cache.keys, cache.values, cache.masked, weights, sizes, norms,
                                  lean_decoder.scale, lean_decoder.heads, lean_decoder.kv_heads, lean_decoder.head_dim)
            token = logits.argmax(-1)
            wall = time.perf_counter() - start
            greedy.append(int(token[0]))
            if first is None:
                first = wall
            else:
                walls.append(wall)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, threads {torch.get_num_threads()}; {rows} rows x {steps} steps after a "
          f"{width}-token prompt")
    print(f"{args.mode}: first step {first:.1f} s (compilation included); then {statistics.median(walls) * 1e3:.1f} "
          f"ms per step (median of {len(walls)}; min {min(walls) * 1e3:.1f})")
    print(f"row 0, greedy: {tokenizer.decode(greedy)!r}")


if __name__ == "__main__":
    main()
