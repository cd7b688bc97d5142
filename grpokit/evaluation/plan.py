"""`grpokit plan`: memory and tokens per step of a config, estimated before launching, and settings that fit a budget.

Only the model's config.json is read: the model is instantiated on the meta device (no weights, no memory), so
parameter counts are exact for any architecture; the activation formula assumes a Llama-style decoder (RMSNorm,
q/k/v/o projections, SDPA, gated MLP), as SmolLM2, Llama, Qwen2 and Mistral are.

Each line is in bytes and belongs to one phase:
- persistent (both phases): on CPU, the Python process itself (interpreter, torch, transformers: the planning
  process's own resident memory after it has built the model on the meta device, as far as a training process gets
  before it loads weights), policy weights, AdamW state (exp_avg + exp_avg_sq in the trainable params' dtype,
  which peft keeps in fp32 for LoRA on a bf16/fp16 model), a frozen reference copy when beta > 0 without LoRA
  (with LoRA the reference is the policy with adapters disabled: nothing extra), the generation's stored
  old / reference log-probs ([rows, T] fp32 each).
- training (one micro-batch's forward + backward): gradients (trainable params; freed after each optimizer step),
  activations, the log-prob chunk's logits, bf16 copies of the Linear weights under bf16 autocast (fp32 weights:
  each linear saves its bf16 weight for backward; with LoRA, one copy of the frozen weights per decoder pass), and
  the AdamW step's temporaries (one trainable-sized buffer; counted instead of the activations when larger, since
  the step runs after backward has freed them).
- generation: the KV cache, the sampler's [rows, V] fp32 logits (x `GEN_LOGIT_COPIES`), one layer's prefill
  intermediates, the bf16 weight copies autocast caches for trainable weights, and (float32 on CPU, linear layers
  on oneDNN) the sampler's packed copy of those layers' weights.
peak = persistent + max(training, generation).

Activations: bytes per token per decoder layer, from what autograd saves (checked against
`torch.autograd.graph.saved_tensors_hooks` on a tiny Llama, tests/unit/test_plan.py). With h hidden, i intermediate,
nq query heads of head_dim d, K key positions the token attends to, a = activation bytes (2 under bf16 autocast or
bf16 weights, else the weights' element size), f = max(4, weight bytes) (RMSNorm computes in fp32), n = bytes of
the normalised RMSNorm output (f, or 2 with bf16/fp16 weights):
    2 RMSNorms:   2 * (h*f + f)                 fp32 input and rsqrt
                + 2 * h*n                       normalised input of the norm weight (only when norm weights train)
    projections:  (h + h + i) * a               inputs of q/k/v (shared), gate/up (shared), down; o_proj's input is
                                                SDPA's output (no copy); under bf16 autocast (5h + i) * a: autocast
                                                casts the input for each of q, k, v, gate and up
    SDPA:         4 * nq*d * a                  q, k and v (k/v repeated to nq heads: transformers repeats them when a
                                                padding mask is passed), output
                + nq * 4 + K * a                logsumexp (fp32), the [Q, K] mask row
    or, where the trainer's grouped attention runs (grpokit.models.attention: bf16 or fp16 on CPU, no gradient
    checkpointing, short sequences):
                  2 * nq*d * a + 2 * nkv*d * a  q, o_proj's input (its own copy of the output here), and k and v
                                                with their nkv heads (not repeated); one mask for all layers
    MLP:          3 * i * a                     SiLU input, SiLU output, up output
With LoRA the frozen base linears save no input; each adapted module of input width m saves m*a (with dropout
m*(b + a): the mask, whose b bytes are those of the module's input (n for q/k/v and gate/up, a for o and down), and
the dropped input) plus r*a (lora_A's output); inputs shared by q/k/v and gate/up count once without dropout,
except under bf16 autocast, where each lora_A casts the norm's float32 output for itself. Under autocast the frozen
weights' bf16 copies are a training line (`autocast_copies`). Outside the layers: the final norm (h*f + f + h*n)
and input ids (8) per token, and the hidden states the log-prob chunks read ([rows, T, h] x n).
A micro-batch of B rows with prompt P and completion T tokens (the config's maxima: an upper bound) forwards
B*(P+T) tokens attending to P+T keys; with share_prompt_forward, its U distinct prompts run once (U*P tokens,
K = P) and the completions run on the prompt cache (B*T tokens, K = P+T, plus each row's P repeated prompt keys and
values saved by SDPA, or their nkv heads by the grouped attention). Gradient checkpointing stores each layer's input
(h x residual bytes per token) and recomputes one layer at a time, so activations are L*tokens*h*r + one layer's +
the outside terms; it also turns share_prompt_forward off (transformers drops the cache inside checkpointed layers).

Log-prob chunk: chunk x V x 4 bytes x `LOGIT_COPIES` (the shifted logits and their exponentials; backward
recomputes the logits and turns them into their gradient in place: logprobs.py).

KV cache: 2 x L x kv_heads x head_dim x positions x dtype bytes (bf16 under autocast). Departure from "prompt
cache once per prompt": the in-process engine prefills each prompt once but `batch_repeat_interleave` copies its
cache to all G rows, so positions = rows x (P + T); with vLLM (prefix caching) positions = prompts x P + rows x T.
With use_vllm in server mode generation runs in another process and is left out; colocated vLLM reserves
vllm_gpu_memory_utilization of the GPU itself, which this estimate does not model beyond its weights and KV cache.

Not counted: the CUDA context on GPU, the tokenizer (~50 MiB for SmolLM2's), the rollout's Python lists, reward
workers (forked before the model loads), and memory the C allocator holds after tensors are freed. That last one is
large on CPU with glibc before 2.39 (2.36 measured): torch allocates CPU tensors with posix_memalign(64), which does
not reuse a freed block for the next block of the same size unless it merged with a free neighbour (see
`allocator_keeps_freed_blocks`), so the same-shaped temporaries of every layer and log-prob chunk take fresh heap.
How much stays depends on the heap's history, not on the config alone: the update's forward with LoRA on
SmolLM2-135M kept 0.15 GiB in a fresh process and 3.5 GiB after a generation or an earlier step (4.7 GiB of live
tensors either time), and runs of one config differed by up to 0.5 GiB; so no line estimates it. `grpokit train`
therefore restarts itself on tcmalloc where it is installed (grpokit.runtime.allocator): the estimate then held
within 12% of the peak RSS on the benchmark configs (benchmarks/RESULTS.md). `render` says when training would
stay on such a glibc.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from grpokit.config import GRPOConfig
from grpokit.runtime import run_device

LOGIT_COPIES = 2  # [chunk, V] float32 tensors alive at once: shifted logits and exp (forward), one in backward
GEN_LOGIT_COPIES = 4  # sampler: float logits, scaled/filtered copies, softmax
MIN_CHUNK = 32  # smallest logprob_chunk_size `suggest` proposes
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@dataclass(slots=True, kw_only=True)
class ModelShape:
    """What the estimate needs from a model's config.json, with exact parameter counts from a meta-device build."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int  # distinct parameters (tied embeddings once)
    linear_weights: int  # weights of every nn.Linear, lm_head included (tied or not): what bf16 autocast copies
    lora_modules: dict[str, tuple[int, int]]  # module name -> (in_features, out_features) for every decoder Linear
    linear_sizes: tuple[int, ...] = ()  # weights of each nn.Linear, lm_head included


@dataclass(slots=True, kw_only=True)
class Line:
    name: str
    bytes: int
    phase: str  # "persistent", "training" or "generation"


@dataclass(slots=True, kw_only=True)
class Estimate:
    lines: list[Line]
    persistent: int
    training: int
    generation: int
    total: int  # persistent + max(training, generation)
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    tokens: dict[str, int] = field(default_factory=dict)


def model_shape(model: str) -> ModelShape:
    """Read config.json of `model` (hub id, directory, or the embedded default) and count parameters on the meta
    device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from grpokit.models.loading import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model))
    return shape_from_config(config, AutoModelForCausalLM)


def shape_from_config(config, model_class=None) -> ModelShape:
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    with torch.device("meta"):
        meta = model_class.from_config(config)
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    linears = {name: mod for name, mod in meta.named_modules() if isinstance(mod, torch.nn.Linear)}
    output = meta.get_output_embeddings()
    return ModelShape(
        hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim, vocab=text.vocab_size,
        params=sum(p.numel() for p in meta.parameters()),
        linear_weights=sum(m.weight.numel() for m in linears.values()),
        linear_sizes=tuple(m.weight.numel() for m in linears.values()),
        lora_modules={name: (m.in_features, m.out_features) for name, m in linears.items() if m is not output})


def lora_targets(shape: ModelShape, target_modules: list[str] | str) -> dict[str, tuple[int, int]]:
    """The Linear modules peft adapts: 'all-linear' = every Linear but the output layer; else names matched by
    suffix."""
    if target_modules == "all-linear":
        return dict(shape.lora_modules)
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    return {m: io for m, io in shape.lora_modules.items() if any(m == n or m.endswith("." + n) for n in names)}


def _prompts_per_micro_batch(rows: int, group: int, total: int) -> int:
    """Most distinct prompts in one micro-batch of `rows` consecutive rows, groups of `group` rows in a generation."""
    return max(len({r // group for r in range(start, min(start + rows, total))}) for start in range(0, total, rows))


# the decoder Linears whose input is an RMSNorm's output (float32 under autocast of float32 weights)
NORM_FED = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})


def estimate(cfg: GRPOConfig, shape: ModelShape, process: int = 0) -> Estimate:
    """Bytes per component and tokens per optimizer step for `cfg` on a model of `shape`; see the module docstring.

    `process`: the Python process's own memory (`process_bytes(cfg)`), a line of its own when non-zero."""
    w = _DTYPE_BYTES[cfg.torch_dtype]
    half_weights = cfg.torch_dtype in ("bfloat16", "float16")
    autocast = cfg.settle_auto().bf16 and not half_weights
    act = 2 if (autocast or half_weights) else w
    f = max(4, w)
    normed = w if half_weights else f
    resid = w if half_weights else f
    h, i, L = shape.hidden, shape.intermediate, shape.layers
    P, T, G = cfg.max_prompt_length or 0, cfg.max_completion_length, cfg.num_generations
    B = cfg.per_device_train_batch_size

    targets = lora_targets(shape, cfg.lora_target_modules) if cfg.use_peft else {}
    lora_dtype = 4 if half_weights else w  # peft keeps adapters of a half-precision model in fp32
    trainable = sum(cfg.lora_r * (n_in + n_out) for n_in, n_out in targets.values()) if cfg.use_peft else shape.params
    train_bytes = lora_dtype if cfg.use_peft else w

    from grpokit.models import attention  # the trainer's attention for short low-precision sequences on CPU

    grouped_ok = (autocast or half_weights) and trains_on_cpu(cfg)

    def grouped(rows: int, queries: int, keys: int, checkpointing: bool) -> bool:
        """Whether the trainer's forward of `rows` x `queries` tokens against `keys` runs `attention`'s grouped
        products (else torch's SDPA); gradient checkpointing keeps SDPA."""
        return grouped_ok and not checkpointing and attention.takes_size(rows, shape.heads, queries, keys)

    def attention_per_token(keys: int, is_grouped: bool) -> float:
        qd = shape.heads * shape.head_dim
        if is_grouped:  # q (grouped copy), k and v (not repeated), o_proj's input; one mask for every layer
            return 2 * qd * act + 2 * shape.kv_heads * shape.head_dim * act
        return 4 * qd * act + shape.heads * 4 + keys * act

    def layer_per_token(keys: int, is_grouped: bool = False) -> float:
        total = 2 * (h * f + f) + attention_per_token(keys, is_grouped) + 3 * i * act
        if not cfg.use_peft:  # autocast casts each linear's input for it: q, k, v and gate, up save a copy each
            return total + 2 * h * normed + ((5 * h if autocast else 2 * h) + i) * act
        per_layer = {name.rsplit(".", 1)[-1]: io for name, io in targets.items() if ".layers.0." in name}
        if cfg.lora_dropout > 0:  # each module: its dropout mask (its input's dtype: the norm's output for q/k/v
            # and gate/up) and the dropped input lora_A saves (autocast's bf16 copy of it)
            total += sum(n_in * ((normed if name in NORM_FED else act) + act) for name, (n_in, _) in per_layer.items())
        elif autocast:  # each lora_A casts the norm's float32 output for itself: q/k/v and gate/up share no copy
            total += sum(n_in * act for name, (n_in, _) in per_layer.items() if name in NORM_FED or name == "down_proj")
        else:  # one saved input per distinct input: q/k/v share theirs, gate/up theirs; o_proj's is SDPA's output
            shared = [{"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"down_proj"}]
            total += sum(per_layer[next(iter(s & per_layer.keys()))][0] * act for s in shared if s & per_layer.keys())
        return total + len(per_layer) * cfg.lora_r * act

    outside_per_token = h * f + f + (0 if cfg.use_peft else h * normed) + 8
    total_rows = cfg.generation_batch_size
    prompts = _prompts_per_micro_batch(B, G, total_rows)
    shared = cfg.share_prompt_forward and P > 0 and prompts < B

    def activations(checkpointing: bool) -> int:
        head_inputs = B * T * h * normed
        if checkpointing or not shared:
            tokens = B * (P + T)
            one_layer = tokens * layer_per_token(P + T, grouped(B, P + T, P + T, checkpointing))
        else:
            tokens = prompts * P + B * T
            completions_grouped = grouped(B, T, P + T, checkpointing)
            kv_heads = shape.kv_heads if completions_grouped else shape.heads  # SDPA saves them repeated
            prompt_kv = B * P * 2 * kv_heads * shape.head_dim * act
            one_layer = (prompts * P * layer_per_token(P, grouped(prompts, P, P, checkpointing))
                         + B * T * layer_per_token(P + T, completions_grouped) + prompt_kv)
        stored = L * tokens * h * resid + one_layer if checkpointing else L * one_layer
        return int(stored + tokens * outside_per_token + head_inputs)

    act_plain, act_ckpt = activations(False), activations(True)
    activation_bytes = act_ckpt if cfg.gradient_checkpointing else act_plain
    chunk = min(cfg.logprob_chunk_size, B * T) * shape.vocab * 4 * LOGIT_COPIES
    quantized = four_bit_numel(shape) if cfg.load_in_4bit else 0
    weights = int(quantized * four_bit_bytes_per_weight(cfg.bnb_4bit_use_double_quant)) + (shape.params - quantized) * w
    cast_copies = autocast_copies(cfg, shape, trainable, shared) if autocast else 0
    optimizer = 2 * trainable * train_bytes
    grads = trainable * train_bytes
    stored_logps = total_rows * T * 4 * (int(cfg.policy_moves) + int(cfg.beta > 0))

    vllm_server = cfg.use_vllm and cfg.vllm_mode == "server"
    kv_bytes = 2 if autocast else w
    gen_prompts = cfg.prompts_per_generation
    positions = gen_prompts * P + total_rows * T if cfg.use_vllm else total_rows * (P + T)
    kv = kv_cache_bytes(shape, positions, kv_bytes)
    gen_logits = total_rows * shape.vocab * 4 * GEN_LOGIT_COPIES
    prefill = int(gen_prompts * P * (4 * h + 3 * i) * act + gen_prompts * P * P * act)
    gen_casts = (shape.linear_weights * 2 if not cfg.use_peft else 0) if autocast else 0
    packed, packed_for = packed_weight_bytes(cfg, shape, autocast, total_rows)

    lines = []
    if process:
        lines.append(Line(name="Python process (interpreter, torch, transformers)", bytes=process, phase="persistent"))
    weights_name = f"weights ({shape.params / 1e6:.1f}M params, {cfg.torch_dtype})"
    if quantized:
        double = ", double quant" if cfg.bnb_4bit_use_double_quant else ""
        weights_name = (f"weights ({shape.params / 1e6:.1f}M params: {quantized / 1e6:.1f}M in 4 bits "
                        f"({cfg.bnb_4bit_quant_type}{double}), the rest {cfg.torch_dtype})")
    lines += [Line(name=weights_name, bytes=weights, phase="persistent"),
              Line(name=f"AdamW state (2 x {trainable / 1e6:.2f}M trainable)", bytes=optimizer, phase="persistent")]
    if cfg.beta > 0 and not cfg.use_peft:
        lines.append(Line(name="reference model weights (beta > 0)", bytes=weights, phase="persistent"))
    if stored_logps:
        lines.append(Line(name="stored old/ref log-probs", bytes=stored_logps, phase="persistent"))
    lines += [Line(name="gradients (trainable params)", bytes=grads, phase="training"),
              Line(name="activations" + (" (gradient checkpointing)" if cfg.gradient_checkpointing else ""),
                   bytes=activation_bytes, phase="training"),
              Line(name=f"log-prob chunk logits ({min(cfg.logprob_chunk_size, B * T)} x {shape.vocab})", bytes=chunk,
                   phase="training")]
    if cast_copies:
        lines.append(Line(name="bf16 copies of linear weights (autocast)", bytes=cast_copies, phase="training"))
    if vllm_server:
        lines.append(Line(name="generation (vLLM server: another process)", bytes=0, phase="generation"))
    else:
        if cfg.use_vllm:
            lines.append(Line(name="vLLM weights (colocated)", bytes=shape.params * 2, phase="generation"))
        lines += [Line(name=f"KV cache ({total_rows} rows x {P}+{T} positions)", bytes=kv, phase="generation"),
                  Line(name="sampler logits and prefill", bytes=gen_logits + prefill, phase="generation")]
        if gen_casts:
            lines.append(Line(name="bf16 weight copies (autocast)", bytes=gen_casts, phase="generation"))
        if packed:
            lines.append(Line(name=f"{packed_for}-packed copies of float32 linear weights (sampler)", bytes=packed,
                              phase="generation"))

    persistent = sum(x.bytes for x in lines if x.phase == "persistent")
    adam_temporaries = trainable * train_bytes
    training = grads + cast_copies + max(activation_bytes + chunk, adam_temporaries)
    generation = sum(x.bytes for x in lines if x.phase == "generation")
    return Estimate(lines=lines, persistent=persistent, training=training, generation=generation,
                    total=persistent + max(training, generation), activations_without_checkpointing=act_plain,
                    activations_with_checkpointing=act_ckpt, tokens=tokens_per_step(cfg, prompts, shared))


def autocast_copies(cfg: GRPOConfig, shape: ModelShape, trainable: int, shared: bool) -> int:
    """Bytes of the bf16 weight copies bf16 autocast holds through a micro-batch's forward and backward (float32
    weights). Full fine-tuning: autocast caches one copy of each trainable weight for the whole forward. LoRA: it
    caches the adapters' copies, but it casts each frozen decoder Linear weight anew at every call and the call's
    backward keeps that copy: once per decoder pass (two with the shared prompt forward: prompts, then
    completions), one layer at a time under gradient checkpointing; the LM head is cast once per log-prob call."""
    if not cfg.use_peft:
        return shape.linear_weights * 2
    decoder = sum(n_in * n_out for n_in, n_out in shape.lora_modules.values())
    head = shape.linear_weights - decoder
    if cfg.load_in_4bit:  # bitsandbytes' 4-bit layers dequantize in their own function: no autocast copies
        decoder = 0
    passes = 1 / shape.layers if cfg.gradient_checkpointing else (2 if shared else 1)
    return int((decoder * passes + head + trainable) * 2)


BNB_4BIT_BLOCKSIZE = 64  # bitsandbytes' 4-bit block: one absmax per 64 weights
BNB_NESTED_BLOCKSIZE = 256  # double quant: the absmaxes quantised to 8 bits in blocks of 256, one float32 each


def four_bit_bytes_per_weight(double_quant: bool) -> float:
    """Bytes per weight bitsandbytes stores for a 4-bit Linear: two weights per byte, plus the absmax of each block
    of 64 (float32; with double quant 8 bits, plus one float32 per 256 of those)."""
    if double_quant:
        return 0.5 + 1 / BNB_4BIT_BLOCKSIZE + 4 / (BNB_4BIT_BLOCKSIZE * BNB_NESTED_BLOCKSIZE)
    return 0.5 + 4 / BNB_4BIT_BLOCKSIZE


def four_bit_numel(shape: ModelShape) -> int:
    """Weights load_in_4bit quantises: every decoder nn.Linear; transformers keeps the output head (lm_head) and
    everything that is not a Linear (embeddings, norms, biases) in the compute dtype."""
    return sum(n_in * n_out for n_in, n_out in shape.lora_modules.values())


def packed_weight_bytes(cfg: GRPOConfig, shape: ModelShape, autocast: bool, rows: int) -> tuple[int, str]:
    """The in-process sampler's copies of the float32 linear weights packed for oneDNN or MKL
    (cpu_linear.packed_weights) when it generates `rows` rows at once, and for which ("oneDNN", "MKL")."""
    from grpokit.models import cpu_linear

    if (cfg.use_vllm or autocast or cfg.torch_dtype != "float32" or cfg.load_in_4bit or not trains_on_cpu(cfg)):
        return 0, ""
    smallest, kind = cpu_linear.min_weight(cfg.cpu_linear, "cpu"), "oneDNN"
    if smallest is None and cpu_linear.mkl_rows(cfg.cpu_linear, "cpu", rows) is not None:
        smallest, kind = cpu_linear.AUTO_MIN_WEIGHT, "MKL"
    return (0, "") if smallest is None else (4 * sum(n for n in shape.linear_sizes if n >= smallest), kind)


def trains_on_cpu(cfg: GRPOConfig) -> bool:
    return run_device(cfg.device).startswith("cpu")


def process_bytes(cfg: GRPOConfig) -> int:
    """This process's resident memory when `cfg` trains on the CPU, else 0 (the budget is then device memory).

    Called after `model_shape`: the process has then imported torch and transformers and built the model class, as a
    training process has before it loads weights."""
    if not trains_on_cpu(cfg):
        return 0
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    except (OSError, StopIteration):  # no procfs (macOS): the peak so far, in bytes there
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def allocator_keeps_freed_blocks() -> bool:
    """Whether `grpokit train`, started from this environment, would hold freed CPU tensor memory.

    torch allocates CPU tensors with posix_memalign(64). glibc's asks the heap for the size plus the alignment, so a
    freed block is too small for the next request of its own size unless it merged with a free neighbour, and before
    the fix for glibc bug 30723 (assumed in 2.39) the small remainders memalign splits off go to the per-thread cache,
    where they stop those merges: the process grows by each freed block (by 128 MiB for 128 freed 1 MiB tensors on
    glibc 2.36, tests/unit/test_plan.py). `grpokit train` restarts itself on tcmalloc there when it is installed
    (grpokit.runtime.allocator), so this holds only when it is not, or when GRPOKIT_ALLOCATOR=system keeps glibc's."""
    from grpokit.runtime import allocator

    return allocator.choose() is None and allocator.keeps_freed_blocks()


FREED_MEMORY_NOTE = [
    "note: `grpokit train` here runs on glibc < 2.39, which does not reuse a freed CPU tensor's block for the next",
    "  tensor of its size, so it also holds freed memory that this estimate does not count; how much depends on the",
    "  heap's history (SmolLM2-135M: peak RSS up to 3.6x the estimate, benchmarks/RESULTS.md). With tcmalloc installed",
    "  (apt install libtcmalloc-minimal4, or conda install gperftools) grpokit runs on it, which reuses them (there:",
    "  the estimate within 12% of the peak, steps no slower); GRPOKIT_ALLOCATOR=system keeps glibc's."]


def kv_cache_bytes(shape: ModelShape, positions: int, dtype_bytes: int) -> int:
    """Bytes of keys + values over all layers for `positions` cached (row x position) entries."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * positions * dtype_bytes


def tokens_per_step(cfg: GRPOConfig, prompts_per_micro_batch: int, shared: bool) -> dict[str, int]:
    """Tokens per optimizer step at the config's maximum lengths (upper bounds)."""
    P, T, B = cfg.max_prompt_length or 0, cfg.max_completion_length, cfg.per_device_train_batch_size
    shared = shared and not cfg.gradient_checkpointing
    prompt_tokens = (prompts_per_micro_batch if shared else B) * P
    steps = cfg.optimizer_steps_per_generation
    scoring = cfg.micro_batches_per_generation * (int(cfg.policy_moves) + int(cfg.beta > 0)) / steps  # no-grad passes
    passes = cfg.gradient_accumulation_steps + scoring
    return {"prompt tokens forwarded": int(passes * prompt_tokens),
            "completion tokens forwarded": int(passes * B * T),
            "tokens forwarded with backward": cfg.gradient_accumulation_steps * (prompt_tokens + B * T),
            "completion tokens generated": cfg.generation_batch_size * T // steps}


@dataclass(slots=True, kw_only=True)
class Suggestion:
    change: str
    updates: dict  # the cumulative config changes
    total: int
    fits: bool


def suggest(cfg: GRPOConfig, budget_bytes: int, shape: ModelShape, process: int = 0) -> list[Suggestion]:
    """Changes, least effect on results first, each applied on top of the previous, until the estimate fits.

    Only changes that lower the estimate are listed; none when the config already fits. `process`: as in `estimate`.
    """
    current = estimate(cfg, shape, process).total
    if current <= budget_bytes:
        return []
    out: list[Suggestion] = []
    updates: dict = {}

    def attempt(change: str, new: dict) -> bool:
        nonlocal current
        candidate = GRPOConfig(**{**cfg.model_dump(exclude_unset=True), **updates, **new})  # validates the geometry
        total = estimate(candidate, shape, process).total
        if total >= current:
            return False
        updates.update(new)
        current = total
        out.append(Suggestion(change=change, updates=dict(updates), total=total, fits=total <= budget_bytes))
        return total <= budget_bytes

    if not cfg.gradient_checkpointing and attempt("gradient_checkpointing: true", {"gradient_checkpointing": True}):
        return out
    batch, accumulation = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    spg = cfg.steps_per_generation
    while batch % 2 == 0:
        batch, accumulation = batch // 2, accumulation * 2
        spg = spg * 2 if spg is not None else None
        new = {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation,
               **({"steps_per_generation": spg} if spg is not None else {})}
        if attempt(f"per_device_train_batch_size: {batch}, gradient_accumulation_steps: {accumulation}"
                   + (f", steps_per_generation: {spg}" if spg is not None else "") + " (same effective batch)", new):
            return out
    chunk = cfg.logprob_chunk_size
    while chunk // 2 >= MIN_CHUNK:
        chunk //= 2
        if attempt(f"logprob_chunk_size: {chunk}", {"logprob_chunk_size": chunk}):
            return out
    lora = f"use_peft: true (LoRA r={cfg.lora_r}, {cfg.lora_target_modules})"
    if not cfg.use_peft and attempt(lora, {"use_peft": True}):
        return out
    if not cfg.settle_auto().bf16 and cfg.torch_dtype == "float32":
        attempt("bf16: true (autocast, fp32 master weights)", {"bf16": True})
    return out


def plan(cfg: GRPOConfig, budget_bytes: int) -> tuple[Estimate, list[Suggestion]]:
    shape = model_shape(cfg.model)
    process = process_bytes(cfg)  # after model_shape: the model class is built, as in a training process
    return estimate(cfg, shape, process), suggest(cfg, budget_bytes, shape, process)


def default_budget(cfg: GRPOConfig) -> tuple[int, str]:
    """(bytes, where from): CUDA device memory when the config trains on cuda, else this machine's total RAM."""
    device = run_device(cfg.device)
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        return torch.cuda.get_device_properties(index).total_memory, f"memory of {torch.cuda.get_device_name(index)}"
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024, "this machine's RAM, /proc/meminfo"
    raise RuntimeError("/proc/meminfo has no MemTotal line; give --memory")


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str) -> int:
    """'16GiB', '16 GB', '1.5e9', '512MiB' -> bytes."""
    number = text.strip()
    for i, ch in enumerate(number):
        if ch.isalpha():
            value, unit = number[:i].strip(), number[i:].strip().lower()
            break
    else:
        value, unit = number, ""
    try:
        result = float(value) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"--memory '{text}': expected a size such as 16GiB, 24GB or 512MiB") from None
    if not math.isfinite(result) or result <= 0:
        raise ValueError(f"--memory '{text}': must be a positive size")
    return int(result)


def human(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def render(cfg: GRPOConfig, est: Estimate, suggestions: list[Suggestion], budget: int, budget_from: str) -> str:
    rows = [(line.name, line.phase, human(line.bytes)) for line in est.lines]
    rows += [("", "", ""), ("persistent (both phases)", "", human(est.persistent)),
             ("training phase", "", human(est.training)), ("generation phase", "", human(est.generation)),
             ("total peak = persistent + max(phases)", "", human(est.total))]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'component':<{width}}  {'phase':<11}  {'size':>11}", "-" * (width + 26)]
    lines += [f"{a:<{width}}  {b:<11}  {c:>11}" for a, b, c in rows]
    lines.append(f"activations: {human(est.activations_without_checkpointing)} without gradient checkpointing, "
                 f"{human(est.activations_with_checkpointing)} with")
    holds_freed = trains_on_cpu(cfg) and allocator_keeps_freed_blocks()
    if holds_freed:
        lines += FREED_MEMORY_NOTE
    lines.append("")
    lines.append("tokens per optimizer step (at max_prompt_length / max_completion_length):")
    key_width = max(len(k) for k in est.tokens)
    lines += [f"  {k:<{key_width}}  {v:>12,}" for k, v in est.tokens.items()]
    lines.append("")
    verdict = "fits" if est.total <= budget else "does NOT fit"
    lines.append(f"budget: {human(budget)} ({budget_from}): the estimate {verdict}"
                 + (" (the freed memory of the note above not counted)" if holds_freed else ""))
    for s in suggestions:
        lines.append(f"  {'fits' if s.fits else '    '}  {human(s.total):>11}  + {s.change}")
    fitting = next((s for s in suggestions if s.fits), None)
    if fitting is not None:
        lines.append("first combination that fits: "
                     + " ".join(f"--set {k}={_yaml(v)}" for k, v in fitting.updates.items()))
    elif suggestions or est.total > budget:
        lines.append("no combination of these changes fits: a smaller model, shorter prompts/completions, "
                     "fewer generations or more memory")
    return "\n".join(lines)


def _yaml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


__all__ = ["Estimate", "Line", "ModelShape", "Suggestion", "default_budget", "estimate", "kv_cache_bytes",
           "model_shape", "parse_size", "plan", "render", "shape_from_config", "suggest"]
