"""A lean forward for the sampler on Llama-family decoders (Llama, Mistral, Qwen2, Qwen3): plain tensor ops.

transformers' forward spends most of a 64-row decode step of SmolLM2-135M outside the model's own work
(about 2,000 operator calls per step, a mask built per step, and under bf16 autocast about 18 dtype casts per
layer: benchmarks/RESULTS.md). `LeanDecoder` computes the same layers with about 40 operator calls per layer:

- float32: the same operations as transformers' Llama code, in the same order, on the model's own linear
  layers (so on the copies `cpu_linear.packed_weights` packed for oneDNN or MKL): its logits equal the model's
  bit for bit (tested). Only single-token decode steps run here; the prompt's prefill stays on the model.
- bf16 (under bf16 autocast on a CPU whose oneDNN has bf16): what autocast computes, with the casts where
  autocast puts them, but each layer's query/key/value products fused into one bf16 product and its gate/up
  products into another, every weight cast to bf16 and packed for oneDNN once per `LeanDecoder`; the residual
  stream stays float32 (as under autocast), keys and values are stored in bf16 (what autocast's attention product
  reads them as), softmax runs in float32. The prompt's prefill runs here too (its attention on torch's SDPA),
  so no second set of bf16 weights is held. Results differ from autocast's in rounding only (tested against the
  trainer's autocast recompute).
- float32 on MKL's packed GEMM (`mkl_rows`: cpu_linear auto on Intel CPUs, where every linear layer is at least
  `cpu_linear.AUTO_MIN_WEIGHT` weights, so the same layers `packed_weights` would pack): each layer's
  query/key/value products fused into one product and its gate/up products into another, on float32 copies packed
  by MKL for the batch's rows (repacked as the batch halves); queries and keys rotated together, in three
  operations. The same float32 math as the model's forward, rounded differently (the fused products, multiply-adds
  in the rotation): tested against float64. Fewer and larger operations per step than on the model's own layers:
  an 8-row step of SmolLM2-135M on a 2-core Xeon went from 49.9 to 44.4 ms (benchmarks/RESULTS.md). The prompt's
  prefill stays on the model.

`unsupported(model)` says why a model cannot take this path (None if it can); the sampler then uses the model's
own forward, as before.
"""

from __future__ import annotations

import torch

from grpokit.models import cpu_linear

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
_LINEARS = (torch.nn.Linear, cpu_linear.OneDNNLinear, cpu_linear.PackedMKLLinear)


def _peft_unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft `PeftModel` (its LoRA layers in place); any other model as it is."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) and type(model).__module__.startswith("peft.") else model


def _is_lora(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Linear" and type(module).__module__ == "peft.tuners.lora.layer"


def _lora_unmergeable(module: torch.nn.Module) -> str | None:
    """Why a peft LoRA linear layer cannot decode on its weight with its active adapters merged in (None if it can):
    plain LoRA only (no DoRA or other variant, no lora_bias), on a plain linear base layer, adapters not merged
    into it already."""
    if not _is_lora(module):
        return f"{type(module).__name__} is not a peft LoRA linear layer"
    if type(module.base_layer) not in _LINEARS:
        return f"its base layer is a {type(module.base_layer).__name__}"
    if module.merged or module.fan_in_fan_out:
        return "adapters merged into the base layer" if module.merged else "fan_in_fan_out"
    variants, biases, dora = (getattr(module, key, {}) for key in ("lora_variant", "lora_bias", "use_dora"))
    for name in _active_adapters(module):  # (older peft has no lora_variant / lora_bias: DoRA shows in use_dora)
        if name in variants or biases.get(name) or dora.get(name):
            return f"adapter {name!r} is not plain LoRA (DoRA or another variant, or lora_bias)"
    return None


def _active_adapters(module: torch.nn.Module) -> list[str]:
    """The adapters a LoRA layer's forward adds (none while adapters are disabled)."""
    if module.disable_adapters:
        return []
    return [name for name in module.active_adapters if name in module.lora_A]


def _base_linear(module: torch.nn.Module) -> torch.nn.Module:
    """The linear layer holding a projection's own weight and bias: a LoRA layer's base layer, else itself."""
    return module.base_layer if _is_lora(module) else module


def _merged_weight(module: torch.nn.Module) -> torch.Tensor:
    """A projection's weight as its forward applies it: a LoRA layer's base weight plus each active adapter's
    scaled product (peft's `get_delta_weight`, what `merge` adds), in a new tensor; a plain layer's own weight."""
    if not _is_lora(module):
        return module.weight
    weight = module.base_layer.weight
    for name in _active_adapters(module):
        weight = weight + module.get_delta_weight(name)
    return weight


def unsupported(model: torch.nn.Module) -> str | None:
    """Why `model` cannot run on `LeanDecoder` (None if it can). A peft model with plain LoRA adapters on its
    linear layers can: the float32 step calls its layers, the fused steps pack their weights with the active
    adapters merged in (`_merged_weight`)."""
    peft_config = getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):  # virtual tokens the lean forward would leave out
        return f"a peft prompt-learning model ({peft_config.peft_type})"
    model = _peft_unwrapped(model)
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES or not type(model).__name__.endswith("ForCausalLM"):
        return f"model type {kind!r} is not one of {ARCHITECTURES}"
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
        return "not a decoder with .model.layers and .model.rotary_emb"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(config, 'hidden_act', None)!r} (only silu)"
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager", "grpokit_decode"):
        return f"attention implementation {config._attn_implementation!r}"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()) or (
            kind == "mistral" and getattr(config, "sliding_window", None) is not None):
        return "sliding-window layers"
    if getattr(config, "pretraining_tp", 1) not in (1, None):
        return "pretraining_tp > 1"
    for module in model.modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f"a forward hook on {type(module).__name__}"
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        for p in projections:
            reason = None if type(p) in _LINEARS else _lora_unmergeable(p)
            if reason is not None:
                return f"linear layers wrapped ({reason})"
    if type(model.lm_head) not in _LINEARS:
        return "the LM head is wrapped"
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return "weights not float32"
    return None


def _normalised(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """transformers' Llama RMSNorm on a float32 input, op for op."""
    return norm.weight * _normalised(x, norm.variance_epsilon)


def _rms_norm_on(x: torch.Tensor, constants: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """`_rms_norm` on a norm's `_norm_constants`: the same operations and float32 values, so the same result
    (tested), without casting the epsilon in every call."""
    return constants[0] * _normalised(x, constants[2])


def _norm_constants(norm: torch.nn.Module, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, width, epsilon) of an RMS norm for `_rms_norm_fast`: the two numbers as 0-dim float32 tensors. A
    Python number in an operation is wrapped into a 0-dim tensor and cast to float32 inside every call (about 13 us
    of a 24 us norm at [8, 576] on a 2-core Xeon); cast once here, they give the same float32 values."""
    return (norm.weight, torch.tensor(float(width), dtype=torch.float32, device=norm.weight.device),
            torch.tensor(norm.variance_epsilon, dtype=torch.float32, device=norm.weight.device))


def _rms_norm_fast(x: torch.Tensor, weight: torch.Tensor, width: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """`_rms_norm` in 7 operator calls instead of 13 (`mean` and `pow` add dtype round trips of scalars), on the
    constants of `_norm_constants`: the same squares, sum and division, so the same result (tested)."""
    return weight * (x * (x * x).sum(-1, keepdim=True).div_(width).add_(eps).rsqrt_())


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotary embedding: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _rotate_fast(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`_rotate` in three operations (no concatenation); same products, rounded once more or less where the CPU
    fuses a multiply-add."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


def _rotate_signed(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`_rotate_fast` in three operator calls: signed_sin is sin with its first half negated (made once a step), and
    the halves swapped by a roll. The same products and sums, so bit for bit `_rotate_fast`'s result (tested)."""
    return (x * cos).addcmul_(x.roll(x.shape[-1] // 2, -1), signed_sin)


def _append_kv(layer, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write one position's key and value [N, Hkv, D] into a cache layer; returns all its keys and values as
    [N * Hkv, L, D] (views where the layer was preallocated: `grpokit.rollout.decode`)."""
    append = getattr(layer, "append_one", None)
    if append is not None:
        return append(key, value)
    keys, values = layer.update(key[:, :, None], value[:, :, None])
    return keys.flatten(0, 1), values.flatten(0, 1)


def attend_one(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
    """Single-token attention: query [N, H, D], key/value [N, Hkv, L, D] -> [N, H * D]. mask [N or 1, 1, 1, P],
    P <= L, over the first P positions: bool (True where masked) or additive float. Each key/value head serves its
    query heads without a repeat copy. Scores as key @ q^T ([L, D] x [D, g] per row and head; on CPU about 1.6x
    faster than q @ key^T), then laid out [N, Hkv, g, L] (a small copy) so that the mask and softmax run along
    contiguous memory. scale: a number, or the same number as a 0-dim float32 tensor (no cast in the call). Also the
    single-token attention of `grpokit.rollout.decode`."""
    batch, heads, dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim) * scale
    scores = torch.matmul(key, q.transpose(-1, -2)).transpose(-1, -2).contiguous()  # [N, Hkv, g, L]
    if mask is not None:
        region = scores[..., :mask.shape[-1]]
        if mask.dtype == torch.bool:
            region.masked_fill_(mask, float("-inf"))
        else:
            region.add_(mask)
    return torch.matmul(scores.softmax(dim=-1), value).reshape(batch, heads * dim)


class LeanDecoder:
    """Decode steps of a supported model: in float32 over a `DynamicCache` whose layers
    `grpokit.rollout.decode.preallocate` gave in-place buffers (the model prefills), or, on the fused MKL products,
    over a `grpokit.rollout.decode.SharedPrefixCache` (each prompt's keys and values once for its rows); in bf16
    over the `BF16Cache` its own `prefill` returns, or over a `grpokit.rollout.decode.SharedBF16Cache` made of it.
    Build it inside the model's no-grad, eval-mode generation; the weights must not change while it is used."""

    def __init__(self, model: torch.nn.Module, *, bf16: bool, rows: int = 64, mkl_rows: int | None = None):
        self.model = model = _peft_unwrapped(model)
        self.base = model.model
        self.layers = list(self.base.layers)
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = self.layers[0].self_attn.head_dim
        self.scale = self.layers[0].self_attn.scaling
        self.bf16 = bf16
        self.fused: list[tuple] = []
        self._logits: torch.Tensor | None = None
        if bf16:
            pack = self._pack_bf16
            for layer in self.layers:
                attn, mlp = layer.self_attn, layer.mlp
                self.fused.append((pack([attn.q_proj, attn.k_proj, attn.v_proj], rows), pack([attn.o_proj], rows),
                                   pack([mlp.gate_proj, mlp.up_proj], rows), pack([mlp.down_proj], rows)))
            self.head = pack([model.lm_head], rows)
        # float32 on MKL's packed GEMM: [(qkv, o, gate_up, down) per layer] + [head], each (packed, shape, bias)
        self.mkl: list | None = None
        self.mkl_rows = 0
        if not bf16 and mkl_rows is not None and self._mkl_applies():
            self._pack_mkl(mkl_rows)
        # each step's per-layer constants, looked up once: (input norm, post-attention norm, query/key norms or
        # None), each norm as `_norm_constants`; then the final norm, and the attention scale as a float32 tensor
        width = config.hidden_size
        self._norms = [(_norm_constants(layer.input_layernorm, width),
                        _norm_constants(layer.post_attention_layernorm, width),
                        getattr(layer.self_attn, "q_norm", None)) for layer in self.layers]
        self._final_norm = _norm_constants(self.base.norm, width)
        self._scale = torch.tensor(self.scale, dtype=torch.float32, device=self.base.norm.weight.device)

    def _groups(self) -> list[list[torch.nn.Module]]:
        """The products of a step in order: per layer query/key/value, output, gate/up, down; then the LM head."""
        groups = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            groups += [[attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj], [mlp.gate_proj, mlp.up_proj],
                       [mlp.down_proj]]
        return groups + [[self.model.lm_head]]

    def _mkl_applies(self) -> bool:
        """Whether the float32 step runs fused on MKL's packed GEMM: plain layers, each at least AUTO_MIN_WEIGHT
        weights (the layers `cpu_linear.packed_weights` packs for MKL, so the plan's count holds), and MKL's op here
        taking a stand-in for the plain weight (`_pack_mkl`)."""
        return cpu_linear.mkl_shape_stand_in_works() and all(
            type(_base_linear(m)) is torch.nn.Linear and _base_linear(m).weight.numel() >= cpu_linear.AUTO_MIN_WEIGHT
            for group in self._groups() for m in group)

    def _pack_mkl(self, rows: int) -> None:
        """(Re)pack every product for `rows` rows, one at a time (each old copy freed before its new one)."""
        self.mkl = self.mkl or [None] * (4 * len(self.layers) + 1)
        self.mkl_rows = rows
        with torch.no_grad():
            for i, group in enumerate(self._groups()):
                self.mkl[i] = None
                weight = torch.cat([_merged_weight(m) for m in group]) if len(group) > 1 else _merged_weight(group[0])
                bias = _fused_bias([_base_linear(m) for m in group])
                # MKL's packed product reads only the shape of the plain weight (every call has the packed rows):
                # a zero-stride view stands in for it, so no concatenated float32 weights are held beside the copies
                self.mkl[i] = (cpu_linear._mkl_pack(weight, rows), weight.new_zeros(()).expand(weight.shape), bias)

    def fit(self, rows: int) -> None:
        """The batch is down to `rows`: once it has halved, repack the float32 products for it; below
        `cpu_linear.MKL_MIN_ROWS` rows drop them and step on the model's own layers."""
        if self.mkl is None or (2 * rows > self.mkl_rows and rows >= cpu_linear.MKL_MIN_ROWS):
            return
        if rows < cpu_linear.MKL_MIN_ROWS:
            self.mkl, self.mkl_rows = None, 0
        else:
            self._pack_mkl(rows)

    def _mkl_mm(self, x: torch.Tensor, product: tuple) -> torch.Tensor:
        """x [m, K] @ a packed product's weight^T (+ bias) -> [m, N]; rows padded with zeros to those packed for."""
        packed, shape, bias = product
        m, rows = x.shape[0], self.mkl_rows
        if m == rows:
            return cpu_linear._mkl_product(x, packed, shape, bias, rows)
        if not rows // 2 < m < rows:
            raise RuntimeError(f"products packed for {rows} rows cannot serve {m}: LeanDecoder.fit was not called")
        return cpu_linear._mkl_product(torch.cat((x, x.new_zeros(rows - m, x.shape[1]))), packed, shape, bias, rows)[:m]

    @staticmethod
    def _pack_bf16(linears: list[torch.nn.Module], rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = torch.cat([_merged_weight(m).detach() for m in linears]).to(torch.bfloat16)
        bias = _fused_bias([_base_linear(m) for m in linears])
        return (torch.ops.mkldnn._reorder_linear_weight(weight, rows),
                None if bias is None else bias.detach().to(torch.bfloat16))

    @staticmethod
    def _mm(x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        return cpu_linear._matmul(x, packed[0], packed[1])

    @staticmethod
    def _qk_norm(attn, q: torch.Tensor, k: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen3's per-head norms of queries and keys (q [.., H, D], k [.., Hkv, D]), as the model computes them."""
        if getattr(attn, "q_norm", None) is None:
            return q, k
        if bf16:  # autocast: the normalised bf16 input is rounded back to bf16, then scaled by the float32 weight
            return tuple(norm.weight * _normalised(x.float(), norm.variance_epsilon).to(torch.bfloat16)
                         for x, norm in ((q, attn.q_norm), (k, attn.k_norm)))
        return _rms_norm(q, attn.q_norm), _rms_norm(k, attn.k_norm)

    def step(self, token: torch.Tensor, position: torch.Tensor, cache, pad: torch.Tensor | None) -> torch.Tensor:
        """One decode step: token [N], position [N] -> float32 logits [N, V]; appends each layer's key and value
        to `cache`. pad [N, 1, 1, P]: True at the padded positions of the prompt (None: no padding)."""
        h = self.base.embed_tokens(token)  # [N, C] float32
        cos, sin = self.base.rotary_emb(h, position[:, None])  # [N, 1, D] float32
        n, heads, kv_heads, dim = h.shape[0], self.heads, self.kv_heads, self.head_dim
        if self.bf16:
            return self._step_bf16(h, cos, sin, cache)
        if self.mkl is not None:
            half = dim // 2
            return self._step_mkl(h, cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1), cache, pad)
        for i, (layer, (in_norm, post_norm, _)) in enumerate(zip(self.layers, self._norms, strict=True)):
            attn, mlp = layer.self_attn, layer.mlp
            x = _rms_norm_on(h, in_norm)
            q = attn.q_proj(x).view(n, heads, dim)
            k = attn.k_proj(x).view(n, kv_heads, dim)
            v = attn.v_proj(x).view(n, kv_heads, 1, dim)
            q, k = self._qk_norm(attn, q, k, False)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            keys, values = cache.layers[i].update(k[:, :, None], v)
            h = h + attn.o_proj(attend_one(q, keys, values, self._scale, pad))
            x = _rms_norm_on(h, post_norm)
            h = h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        return self.model.lm_head(_rms_norm_on(h, self._final_norm)).float()

    def _step_mkl(self, h: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, cache,
                  pad: torch.Tensor | None) -> torch.Tensor:
        """signed_sin: sin with its first half negated (`_rotate_signed`)."""
        n, heads, kv_heads, dim = h.shape[0], self.heads, self.kv_heads, self.head_dim
        split, groups = (heads + kv_heads) * dim, heads // kv_heads
        mm, products, scale = self._mkl_mm, self.mkl, self._scale
        shared = getattr(cache, "shared", False)  # a `grpokit.rollout.decode.SharedPrefixCache`
        if shared:
            cache.advance()
        for i, (in_norm, post_norm, q_norm) in enumerate(self._norms):
            qkv_w, o_w, gate_up_w, down_w = products[4 * i:4 * i + 4]
            qkv = mm(_rms_norm_fast(h, *in_norm), qkv_w)  # [N, (H + 2 Hkv) D]
            qk = qkv[:, :split].view(n, heads + kv_heads, dim)
            if q_norm is not None:
                qk = torch.cat(self._qk_norm(self.layers[i].self_attn, qk[:, :heads], qk[:, heads:], False), dim=1)
            qk = _rotate_signed(qk, cos, signed_sin)
            if shared:  # each prompt's keys and values read once for its rows (its own padding mask)
                out = cache.attend(i, torch.mul(qk[:, :heads], scale), qk[:, heads:],
                                   qkv[:, split:].view(n, kv_heads, dim))
            else:
                keys, values = _append_kv(cache.layers[i], qk[:, heads:], qkv[:, split:].view(n, kv_heads, dim))
                # attention in [N * Hkv] batched products over the cache's views (as attend_one, without its 4-D
                # matmuls)
                scores = torch.bmm(torch.mul(qk[:, :heads], scale).view(n * kv_heads, groups, dim),
                                   keys.transpose(1, 2))  # [N * Hkv, g, L]
                if pad is not None:
                    scores.view(n, kv_heads, groups, -1)[..., :pad.shape[-1]].masked_fill_(pad, float("-inf"))
                out = torch.bmm(scores.softmax(dim=-1), values).view(n, heads * dim)
            h = h + mm(out, o_w)
            gate_up = mm(_rms_norm_fast(h, *post_norm), gate_up_w)
            half = gate_up.shape[-1] // 2
            h = h + mm(torch.nn.functional.silu(gate_up[:, :half]) * gate_up[:, half:], down_w)
        return mm(_rms_norm_fast(h, *self._final_norm), products[-1])

    def _step_bf16(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: BF16Cache) -> torch.Tensor:
        n, heads, kv_heads, dim = h.shape[0], self.heads, self.kv_heads, self.head_dim
        split = (heads + kv_heads) * dim
        pos = kv.advance()
        for i, (layer, (in_norm, post_norm, _)) in enumerate(zip(self.layers, self._norms, strict=True)):
            attn = layer.self_attn
            qkv_w, o_w, gate_up_w, down_w = self.fused[i]
            qkv = self._mm(_rms_norm_on(h, in_norm).to(torch.bfloat16), qkv_w)  # [N, (H + 2 Hkv) D]
            qk = qkv[:, :split].view(n, heads + kv_heads, dim)
            if getattr(attn, "q_norm", None) is not None:
                qk = torch.cat(self._qk_norm(attn, qk[:, :heads], qk[:, heads:], True), dim=1)
            qk = _rotate_fast(qk.float(), cos, sin)  # float32, as autocast's bf16 x float32 products promote
            kv.keys[i][:, :, pos] = qk[:, heads:]  # rounded to bf16: what autocast's attention product reads
            kv.values[i][:, :, pos] = qkv[:, split:].view(n, kv_heads, dim)
            q = (qk[:, :heads] * self._scale).to(torch.bfloat16)
            h = h + self._mm(kv.attend(i, q), o_w)
            gate_up = self._mm(_rms_norm_on(h, post_norm).to(torch.bfloat16), gate_up_w)
            half = gate_up.shape[-1] // 2
            h = h + self._mm(torch.nn.functional.silu(gate_up[:, :half]) * gate_up[:, half:], down_w)
        logits = self._mm(_rms_norm_on(h, self._final_norm).to(torch.bfloat16), self.head)
        if self._logits is None or self._logits.shape[0] < n:  # reused: a fresh [N, V] tensor page-faults every step
            self._logits = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        return self._logits[:n].copy_(logits)

    def prefill(self, input_ids: torch.Tensor, attention: torch.Tensor,
                positions: torch.Tensor) -> tuple[torch.Tensor, BF16Cache]:
        """bf16 only: the prompts' forward, input_ids / attention (1 real, 0 padding) / positions [B, W], left
        padded -> (float32 logits of the last position [B, V], a `BF16Cache` of the prompts' keys and values).
        Attention on torch's SDPA, causal over real positions (a padding position sees itself only: its output is
        never read)."""
        if not self.bf16:
            raise ValueError("LeanDecoder.prefill runs the bf16 path only; float32 prefills on the model")
        batch, width = input_ids.shape
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        split = (heads + kv_heads) * dim
        h = self.base.embed_tokens(input_ids)  # [B, W, C] float32
        cos, sin = self.base.rotary_emb(h, positions)  # [B, W, D]
        cos, sin = cos[:, :, None], sin[:, :, None]
        causal = torch.ones(width, width, dtype=torch.bool, device=h.device).tril()
        mask = (causal & attention[:, None, :].bool()) | torch.eye(width, dtype=torch.bool, device=h.device)
        mask = mask[:, None]  # [B, 1, W, W]
        kv = BF16Cache(len(self.layers), batch, kv_heads, dim, width, attention == 0, h.device)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            qkv_w, o_w, gate_up_w, down_w = self.fused[i]
            x = _rms_norm(h, layer.input_layernorm).to(torch.bfloat16).view(batch * width, -1)
            qkv = self._mm(x, qkv_w).view(batch, width, -1)
            qk = qkv[..., :split].view(batch, width, heads + kv_heads, dim)
            if getattr(attn, "q_norm", None) is not None:
                qk = torch.cat(self._qk_norm(attn, qk[:, :, :heads], qk[:, :, heads:], True), dim=2)
            qk = _rotate(qk.float(), cos, sin).to(torch.bfloat16).transpose(1, 2)  # [B, H + Hkv, W, D]
            keys, values = qk[:, heads:], qkv[..., split:].view(batch, width, kv_heads, dim).transpose(1, 2)
            kv.keys[i][:, :, :width] = keys
            kv.values[i][:, :, :width] = values
            out = torch.nn.functional.scaled_dot_product_attention(qk[:, :heads], keys, values, attn_mask=mask,
                                                                   scale=self.scale, enable_gqa=heads != kv_heads)
            h = h + self._mm(out.transpose(1, 2).reshape(batch * width, heads * dim), o_w).view(batch, width, -1)
            x = _rms_norm(h, layer.post_attention_layernorm).to(torch.bfloat16).view(batch * width, -1)
            gate_up = self._mm(x, gate_up_w)
            half = gate_up.shape[-1] // 2
            out = self._mm(torch.nn.functional.silu(gate_up[:, :half]) * gate_up[:, half:], down_w)
            h = h + out.view(batch, width, -1)
        logits = self._mm(_rms_norm(h[:, -1], self.base.norm).to(torch.bfloat16), self.head).float()
        return logits, kv


def _fused_bias(linears: list[torch.nn.Module]) -> torch.Tensor | None:
    """The biases of linear layers whose weights are concatenated into one product (zeros for a layer without);
    None if none has one."""
    if all(m.bias is None for m in linears):
        return None
    return torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])


class BF16Cache:
    """The bf16 path's keys and values: per layer [N, Hkv, C, D] bf16 buffers, zero past the filled length, and
    one mask [N, 1, 1, C] (True: padding or not yet filled) shared by every layer. Attention reads whole buffers
    (contiguous: a filled prefix of a longer buffer is a strided view that torch's bf16 batched product would
    copy every call), so capacity grows in steps of `CHUNK` positions rather than being reserved up front."""

    CHUNK = 32

    def __init__(self, layers: int, batch: int, kv_heads: int, dim: int, length: int, padding: torch.Tensor,
                 device: torch.device):
        capacity = length + self.CHUNK
        self.keys = [torch.zeros(batch, kv_heads, capacity, dim, dtype=torch.bfloat16, device=device)
                     for _ in range(layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.masked = torch.ones(batch, 1, 1, capacity, dtype=torch.bool, device=device)
        self.masked[:, 0, 0, :length] = padding
        self.length = length

    def advance(self) -> int:
        """Open the next position (growing the buffers when full); returns its index."""
        if self.length == self.masked.shape[-1]:
            self.keys = [self._grow(k) for k in self.keys]
            self.values = [self._grow(v) for v in self.values]
            self.masked = torch.cat((self.masked, self.masked.new_ones((*self.masked.shape[:-1], self.CHUNK))), -1)
        self.masked[..., self.length] = False
        self.length += 1
        return self.length - 1

    def _grow(self, buffer: torch.Tensor) -> torch.Tensor:
        grown = buffer.new_zeros((*buffer.shape[:-2], buffer.shape[-2] + self.CHUNK, buffer.shape[-1]))
        grown[..., :buffer.shape[-2], :] = buffer
        return grown

    def attend(self, i: int, query: torch.Tensor) -> torch.Tensor:
        """Layer i's single-token attention: query [N, H, D] bf16, already scaled -> [N, H * D] bf16; softmax in
        float32. Each key/value head serves its query heads without a repeat copy."""
        keys, values = self.keys[i], self.values[i]
        batch, kv_heads, capacity, dim = keys.shape
        groups = query.shape[1] // kv_heads
        scores = torch.bmm(query.reshape(batch * kv_heads, groups, dim),
                           keys.view(batch * kv_heads, capacity, dim).transpose(1, 2))
        scores = scores.view(batch, kv_heads, groups, capacity).masked_fill_(self.masked, float("-inf"))
        weights = scores.softmax(dim=-1, dtype=torch.float32).to(torch.bfloat16)
        out = torch.bmm(weights.view(batch * kv_heads, groups, capacity), values.view(batch * kv_heads, capacity, dim))
        return out.view(batch, -1)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.keys = [k[indices] for k in self.keys]
        self.values = [v[indices] for v in self.values]
        self.masked = self.masked[indices]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self.masked.shape[0], device=self.masked.device)
                                  .repeat_interleave(repeats))
