"""Rollout speed: grpokit's TorchEngine vs transformers' `model.generate` on the same batch.

Both sample G completions for each of P chat prompts (same temperature / top-p / top-k, the
model's EOS as the stop token unless --no-stop), from the same fp32 model in one process. Each
variant gets a short warm-up run (16 tokens), then the variants alternate for --repeats runs so
drift on the machine hits both alike. Tokens/s counts generated completion tokens (up to and including EOS);
seconds are wall time of the whole call (prefill + decode + sampling).

  grpokit               TorchEngine.generate(prompt_ids, n=G, params), float32 linear layers as a grpokit
                        run on this machine has them (cpu_linear: auto; --cpu-linear to force)
  grpokit-torch-linear  the same with torch's own linear kernel (MKL's sgemm; cpu_linear: torch, so no weights
                        packed for MKL's packed GEMM, which auto uses on Intel CPUs)
  grpokit-unfused       grpokit with its float32 decode on the model's own linear layers, each packed for MKL on its
                        own (what cpu_linear auto did on Intel CPUs before the lean decoder fused its products)
  grpokit-per-row-prompts  grpokit with each row's copy of its prompt's keys and values, read by every row, instead
                        of each prompt's once for its rows (the fused float32 step's SharedPrefixCache)
  grpokit-model-forward grpokit decoding on the model's own forward instead of its lean decoder (what a LoRA model
                        did before the lean decoder merged adapters: see --lora)
  grpokit-cat-cache     grpokit without its in-place KV cache (transformers' cache, grown by torch.cat)
  grpokit-sdpa          grpokit with torch's SDPA for single-token attention instead of its two matmuls
  grpokit-unpacked      grpokit with its linears on the plain weights (none reordered for oneDNN or packed for MKL
                        once per call)
  hf                    model.generate(do_sample=True, num_return_sequences=G) on the left-padded prompts
  hf-onednn-linear      the same on the model with grpokit's oneDNN linear layers (isolates the kernels'
                        share of the difference from the sampler's)
  grpokit-bf16          grpokit under bf16 autocast, as a `bf16: true` run generates: linear layers on bf16
                        weight copies packed once per call for oneDNN (cpu_linear.packed_weights)
  grpokit-bf16-per-row-prompts  grpokit-bf16 with each row's copy of its prompt's keys and values instead of
                        each prompt's once for its rows (the bf16 step's SharedBF16Cache)
  grpokit-bf16-autocast the same with autocast's own per-call bf16 linears (no packed bf16 copies: before)
  hf-bf16               model.generate under bf16 autocast

With --floor, the weight-read floor of a decode step is printed beside the table: the model's weight bytes in
float32 and in bf16 over this machine's read bandwidth (a timed sum over a 1 GiB float32 buffer), and each
variant's seconds per decode position (wall time over --new-tokens; use --no-stop so every row runs them all). For
variants that decode on grpokit's lean decoder it also prints the decode steps alone (`LeanDecoder.step`, timed
around each call): the part of a position the floor bounds, without the prefill, the packing of the weights once a
generation and the sampling.

Usage: python benchmarks/sampler.py [--model PATH] [--prompts 8 --group 8 --new-tokens 128]
       [--repeats 5 --threads 2] [--temperature 1.0 --top-p 1.0 --top-k 0] [--no-stop]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

QUESTIONS = [
    "What is 17 * 23? Explain step by step.",
    "Write a short poem about the sea.",
    "A train travels 120 km in 1.5 hours. What is its average speed?",
    "List three uses of a paper clip.",
    "Explain why the sky is blue in two sentences.",
    "If x + 3 = 10, what is 2x?",
    "Give a recipe for a simple tomato sauce.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Summarise the plot of Romeo and Juliet.",
    "How many prime numbers are there below 30? List them.",
    "Translate 'good morning, how are you?' into French.",
    "Write a Python function that reverses a string.",
]


INSTRUCTIONS = ("You are a careful assistant. Read the question, think step by step, check each step, and give the "
                "final answer on its own line after 'Answer:'. Keep the reasoning short and plain.")


def _prompt_ids(tokenizer, count: int, system_words: int = 0) -> list[list[int]]:
    """count chat prompts; system_words > 0 puts a system message of that many words (the instructions repeated)
    before each question, as tasks with instructions or examples have longer prompts."""
    texts = [QUESTIONS[i % len(QUESTIONS)] for i in range(count)]
    words = INSTRUCTIONS.split()
    system = [{"role": "system", "content": " ".join(words[i % len(words)] for i in range(system_words))}]
    return [tokenizer.apply_chat_template((system if system_words else []) + [{"role": "user", "content": t}],
                                          add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            for t in texts]


def run_grpokit(engine, prompts, args, stop_ids, seed, entropies: bool = False) -> int:
    from grpokit.rollout.base import SamplingParams

    params = SamplingParams(max_tokens=args.new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, stop_token_ids=stop_ids, seed=seed, entropies=entropies)
    rollout = engine.generate(prompts, args.group, params)
    return sum(len(c) for c in rollout.completion_ids)


def run_hf(model, tokenizer, prompts, args, stop_ids, seed) -> int:
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_new_tokens=args.new_tokens, num_return_sequences=args.group,
                              eos_token_id=stop_ids or None, pad_token_id=pad)
    torch.manual_seed(seed)
    out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)
    completions = out[:, width:]  # [P*G, T]
    if not stop_ids:
        return completions.numel()
    total = 0
    for row in completions.tolist():
        ends = [i for i, tok in enumerate(row) if tok in stop_ids]
        total += ends[0] + 1 if ends else len(row)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="model directory, hub id or grpokit model name")
    parser.add_argument("--prompts", type=int, default=8, help="number of distinct prompts")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--new-tokens", type=int, default=128, help="max new tokens per completion")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (after one warm-up each)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--no-stop", action="store_true", help="ignore EOS: every completion runs to --new-tokens")
    parser.add_argument("--variants", default="grpokit,hf",
                        help="comma-separated subset of grpokit, grpokit-entropies (each token's entropy too, as a "
                             "run asks where silent rows take theirs from the sampler), grpokit-torch-linear, "
                             "grpokit-unfused, grpokit-model-forward, "
                             "grpokit-cat-cache, grpokit-sdpa, grpokit-unpacked, hf, hf-onednn-linear, grpokit-bf16, "
                             "grpokit-bf16-per-row-prompts, grpokit-bf16-autocast, hf-bf16")
    parser.add_argument("--floor", action="store_true", help="print the weight-read floor per decode step")
    parser.add_argument("--system-words", type=int, default=0,
                        help="a system message of this many words before each question (longer prompts)")
    parser.add_argument("--cpu-linear", default="auto", choices=["auto", "onednn", "torch"],
                        help="grpokit's cpu_linear setting for the 'grpokit' variant (auto: as a run here chooses)")
    parser.add_argument("--lora", type=int, default=0, metavar="R",
                        help="wrap the model in LoRA adapters of rank R on every linear layer (grpokit's LoRA "
                             "default, lora_B drawn at random so the adapters count), as a LoRA run generates")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from grpokit.models import cpu_linear
    from grpokit.models.loading import load_policy, resolve_model_path
    from grpokit.rollout.torch_engine import TorchEngine

    path = resolve_model_path(args.model)
    model = load_policy(path).eval()
    if args.lora:
        from grpokit.models.loading import add_lora

        model = add_lora(model, args.lora, 2 * args.lora, 0.0, "all-linear").eval()
        torch.manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.01)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = _prompt_ids(tokenizer, args.prompts, args.system_words)
    stop_ids = [] if args.no_stop else [tokenizer.eos_token_id]
    engine = TorchEngine(model, tokenizer.pad_token_id, cpu_linear=args.cpu_linear)
    torch_engine = TorchEngine(model, tokenizer.pad_token_id, cpu_linear="torch")

    def linears(onednn: bool):  # the model's float32 linear layers on oneDNN (as grpokit trains) or torch's own
        if onednn:
            cpu_linear.use_onednn(model)
        else:
            cpu_linear.restore(model)

    def without(name: str, seed: int) -> int:  # grpokit with one of its decode helpers switched off
        from contextlib import nullcontext
        from unittest import mock

        from grpokit.models import decoder
        from grpokit.rollout import decode
        from grpokit.rollout import torch_engine as torch_engine_module

        patch = {"cat-cache": mock.patch.object(decode, "preallocate", lambda cache, extra: 0),
                 "sdpa": mock.patch.object(decode, "decode_attention", lambda model: nullcontext(False)),
                 "unpacked": mock.patch.multiple(cpu_linear, packed_weights=lambda model, **_: nullcontext(0),
                                                 mkl_shape_stand_in_works=lambda: False),  # no fused MKL copies
                 "unfused": mock.patch.object(decoder.LeanDecoder, "_mkl_applies", lambda self: False),
                 "per-row-prompts": mock.patch.object(decode.SharedPrefixCache, "applies",
                                                      staticmethod(lambda cache: False)),
                 "bf16-per-row-prompts": mock.patch.object(decode.SharedBF16Cache, "applies",
                                                           staticmethod(lambda cache: False)),
                 "model-forward": mock.patch.object(torch_engine_module, "lean_mode", lambda model: None)}[name]
        linears(grpokit_onednn)
        with patch:
            if name.startswith("bf16"):
                return bf16(lambda: run_grpokit(engine, prompts, args, stop_ids, seed))
            return run_grpokit(engine, prompts, args, stop_ids, seed)

    def bf16(run, packed: bool = True):  # under bf16 autocast, as the trainer generates with `bf16: true`
        from contextlib import nullcontext
        from unittest import mock

        linears(grpokit_onednn)
        patch = nullcontext() if packed else mock.patch.object(cpu_linear, "_bf16_packing_applies", lambda: False)
        with patch, torch.autocast("cpu", dtype=torch.bfloat16):
            return run()

    grpokit_onednn = cpu_linear.apply(model, args.cpu_linear, "cpu")  # what a grpokit run here chooses
    runners = {
        "grpokit": lambda seed: linears(grpokit_onednn) or run_grpokit(engine, prompts, args, stop_ids, seed),
        "grpokit-entropies": lambda seed: linears(grpokit_onednn) or run_grpokit(engine, prompts, args, stop_ids, seed,
                                                                                entropies=True),
        "grpokit-cat-cache": lambda seed: without("cat-cache", seed),
        "grpokit-sdpa": lambda seed: without("sdpa", seed),
        "grpokit-unpacked": lambda seed: without("unpacked", seed),
        "grpokit-unfused": lambda seed: without("unfused", seed),
        "grpokit-per-row-prompts": lambda seed: without("per-row-prompts", seed),
        "grpokit-model-forward": lambda seed: without("model-forward", seed),
        "grpokit-torch-linear": lambda seed: linears(False) or run_grpokit(torch_engine, prompts, args, stop_ids,
                                                                           seed),
        "hf": lambda seed: linears(False) or run_hf(model, tokenizer, prompts, args, stop_ids, seed),
        "hf-onednn-linear": lambda seed: linears(True) or run_hf(model, tokenizer, prompts, args, stop_ids, seed),
        "grpokit-bf16": lambda seed: bf16(lambda: run_grpokit(engine, prompts, args, stop_ids, seed)),
        "grpokit-bf16-per-row-prompts": lambda seed: without("bf16-per-row-prompts", seed),
        "grpokit-bf16-autocast": lambda seed: bf16(lambda: run_grpokit(engine, prompts, args, stop_ids, seed),
                                                   packed=False),
        "hf-bf16": lambda seed: linears(False) or bf16(lambda: run_hf(model, tokenizer, prompts, args, stop_ids,
                                                                      seed)),
    }
    variants = args.variants.split(",")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; model {path}; CPU vendor "
          f"{cpu_linear.cpu_vendor() or 'unknown'}: the 'grpokit' variant's linear layers on "
          f"{'oneDNN' if grpokit_onednn else 'torch'}"
          f"{', decode on MKL packed' if cpu_linear.mkl_rows(args.cpu_linear, 'cpu', 8) else ''} "
          f"(cpu_linear: {args.cpu_linear})")
    print(f"prompt tokens: {sorted(len(p) for p in prompts)}")
    print(f"{args.prompts} prompts x G={args.group}, {args.new_tokens} new tokens, T={args.temperature}, "
          f"top_p={args.top_p}, top_k={args.top_k}, stop={'none' if args.no_stop else 'eos'}")

    step_times: dict[str, list[float]] = {name: [] for name in variants}
    running: list[str | None] = [None]  # the timed variant: its lean decode steps are recorded
    if args.floor:
        from grpokit.models import decoder

        step = decoder.LeanDecoder.step

        def timed_step(*a, **k):
            start = time.perf_counter()
            out = step(*a, **k)
            if running[0] is not None:
                step_times[running[0]].append(time.perf_counter() - start)
            return out

        decoder.LeanDecoder.step = timed_step

    full_length = args.new_tokens
    args.new_tokens = min(16, full_length)
    for name in variants:  # a short warm-up: first-call allocations, lazy imports
        runners[name](seed=12345)
    args.new_tokens = full_length
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    tokens: dict[str, list[int]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name in variants if repeat % 2 == 0 else variants[::-1]:
            running[0] = name
            start = time.perf_counter()
            count = runners[name](seed=repeat)
            seconds[name].append(time.perf_counter() - start)
            running[0] = None
            tokens[name].append(count)
            print(f"  run {repeat} {name}: {seconds[name][-1]:.2f} s, {count} tokens", flush=True)

    print(f"load after: {os.getloadavg()}")
    print("| variant | seconds: median (min-max) | tokens/s: median (min-max) | tokens per run: median |")
    print("|---|---|---|---|")
    for name in variants:
        rates = [t / s for t, s in zip(tokens[name], seconds[name], strict=True)]
        print(f"| {name} | {statistics.median(seconds[name]):.2f} ({min(seconds[name]):.2f}-{max(seconds[name]):.2f}) "
              f"| {statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f}) "
              f"| {statistics.median(tokens[name]):.0f} |")
    rate = {name: statistics.median([t / s for t, s in zip(tokens[name], seconds[name], strict=True)])
            for name in variants}
    if args.floor:
        weights = sum(p.numel() for p in model.parameters())
        buffer = torch.ones(1 << 28)  # 1 GiB of float32
        buffer.sum()
        reads = []
        for _ in range(5):
            start = time.perf_counter()
            buffer.sum()
            reads.append(time.perf_counter() - start)
        bandwidth = buffer.numel() * 4 / statistics.median(reads)
        print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s (sum over 1 GiB, median of 5); {weights / 1e6:.1f}M "
              f"weights: floor per decode step {weights * 4 / bandwidth * 1e3:.1f} ms in float32, "
              f"{weights * 2 / bandwidth * 1e3:.1f} ms in bf16")
        floor = weights * 4 / bandwidth
        for name in variants:
            per_step = statistics.median(seconds[name]) / args.new_tokens
            line = f"{name}: {per_step * 1e3:.1f} ms per decode position ({per_step / floor:.2f}x the float32 floor)"
            if step_times[name]:
                times = sorted(step_times[name])
                alone = statistics.median(times)
                line += (f"; decode steps alone {alone * 1e3:.1f} ms, median of {len(times)} (10th-90th percentile "
                         f"{times[len(times) // 10] * 1e3:.1f}-{times[len(times) * 9 // 10] * 1e3:.1f}): "
                         f"{alone / floor:.2f}x the float32 floor")
            print(line)
    if "hf" in variants:
        for name in variants:
            if name != "hf":
                print(f"tokens/s ratio {name}/hf: {rate[name] / rate['hf']:.2f}; seconds ratio hf/{name}: "
                      f"{statistics.median(seconds['hf']) / statistics.median(seconds[name]):.2f}")

if __name__ == "__main__":
    main()
