"""Attention for the trainer's log-prob forward on CPU: short sequences in a few large products.

torch's CPU flash-attention kernel (what transformers' "sdpa" runs there) works in small tiles; on the short
sequences of a GRPO update its backward is slow: for 8 rows x 128 completion tokens of SmolLM2-135M under bf16
autocast a layer's forward and backward take about 10.5 ms there, against about 8 ms here (benchmarks/RESULTS.md).
`_GroupedAttention` computes attention in batched matrix products: each key/value head with all of its query heads
in one product (no `repeat_kv` copy), scores and their gradient in float32 as the flash kernel accumulates them,
softmax in float32, and a backward that recomputes the probabilities, as flash attention does, so that no
[B, H, Tq, Tk] tensor outlives a layer's forward. Under autocast the other products run in the autocast dtype.

Only bf16 (or float16) work is taken: in float32 the two measured alike, and float32 results stay as they were.
Longer sequences keep torch's kernel, which wins there: the switch is per call, on the size of the score matrix
(`_MAX_SCORES_PER_HEAD`, `_MAX_SCORES`). So do other devices, dropout, soft-capping, attention sinks and masks
that are not [B or 1, 1, Tq, Tk].

`training_attention(model)` switches a model's "sdpa" configs to this implementation for the duration of its
context (`grpokit.models.logprobs.completion_logps` enters it), except under gradient checkpointing, whose
recompute in the backward runs outside the context.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMPLEMENTATION = "grpokit_train"

# One head's score matrix above this many entries (Tq x Tk) goes to torch's kernel. Measured on a 2-core Xeon
# (SmolLM2-135M, bf16 autocast, 8 rows, the update benchmark): the update is 4-8% faster at 48 completion tokens and
# 7% at 128, and 5-10% slower at 256 (benchmarks/RESULTS.md).
_MAX_SCORES_PER_HEAD = 128 * 256
# and a whole layer's above this many (B x H x Tq x Tk): its float32 scores are held while the layer runs
_MAX_SCORES = 1 << 24


def checkpointing(model: torch.nn.Module) -> bool:
    """Whether `model` runs its layers under gradient checkpointing (transformers' name for it changed in 5.x)."""
    checkpointed = getattr(model, "is_activation_checkpointing", None)
    if checkpointed is None:
        checkpointed = getattr(model, "is_gradient_checkpointing", False)
    return bool(checkpointed)


@contextlib.contextmanager
def switched(model: torch.nn.Module, implementation: str, only_from: str = "sdpa") -> Iterator[bool]:
    """Inside the context, the model's configs whose attention implementation is `only_from` use `implementation`;
    yields whether any was switched. Each config is switched once, however many modules share it."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) == only_from:
            configs[id(config)] = config
    for config in configs.values():
        config._attn_implementation_internal = implementation
    try:
        yield bool(configs)
    finally:
        for config in configs.values():
            config._attn_implementation_internal = only_from


@contextlib.contextmanager
def training_attention(model: torch.nn.Module) -> Iterator[bool]:
    """`_attention` for the model's "sdpa" layers inside the context (not under gradient checkpointing)."""
    if checkpointing(model):
        yield False
        return
    with switched(model, IMPLEMENTATION) as on:
        yield on


def _takes(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, dropout: float,
           kwargs: dict) -> bool:
    """Whether `_attention` computes this call itself (else torch's SDPA does, through transformers)."""
    batch, heads, length, dim = query.shape
    keys = key.shape[2]
    if (query.device.type != "cpu" or dropout != 0.0 or length < 2 or key.shape[1] == 0 or heads % key.shape[1]
            or value.shape[-1] != dim or key.shape[-1] != dim):
        return False
    if any(kwargs.get(name) is not None for name in ("softcap", "position_bias", "s_aux")):
        return False
    if attention_mask is None and length != keys:  # transformers' SDPA crops the keys then: leave it that case
        return False
    if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1
                                       or attention_mask.shape[-2:] != (length, keys)):
        return False
    return takes_size(batch, heads, length, keys)


def takes_size(batch: int, heads: int, queries: int, keys: int) -> bool:
    """Whether a call of this size runs here (smaller than the size gate); also read by `grpokit plan`."""
    return queries * keys <= _MAX_SCORES_PER_HEAD and batch * heads * queries * keys <= _MAX_SCORES


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' attention contract: query [B, H, Tq, D], key/value [B, Hkv, Tk, D], mask bool (True where
    attended) or additive [B or 1, 1, Tq, Tk], or None -> ([B, Tq, H, D], None)."""
    autocast = torch.is_autocast_enabled("cpu") and query.dtype == torch.float32  # autocast casts float32 only
    dtype = torch.get_autocast_dtype("cpu") if autocast else query.dtype
    if dtype not in (torch.bfloat16, torch.float16) or not _takes(module, query, key, value, attention_mask, dropout,
                                                                   kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    mask = attention_mask
    causal = kwargs.get("is_causal")
    if mask is None and (getattr(module, "is_causal", True) if causal is None else causal):  # as SDPA's is_causal
        mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()[None, None]
    out = _GroupedAttention.apply(query, key, value, mask, scale, dtype)
    return out.transpose(1, 2).contiguous(), None  # contiguous, as transformers' own attention functions return


AttentionInterface.register(IMPLEMENTATION, _attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def _bias(mask: torch.Tensor | None) -> torch.Tensor | None:
    """float32 additive form of a mask: 0 where attended, the float32 minimum where not (finite: a row with no key
    attended averages every value instead of turning NaN). Built per call from the mask that every layer shares."""
    low = torch.finfo(torch.float32).min
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, low)
    return mask.float().clamp(min=low)


def _probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float, groups: int) -> torch.Tensor:
    """float32 attention probabilities [B, Hkv, g, Tq, Tk] (float64 for float64 inputs) of grouped queries
    q [B, Hkv, g * Tq, D]. The scores are a float32 product of the low-precision q and k, as torch's flash kernel
    accumulates them: large scores (attention sinks) are not rounded to bf16. Then bias + scale x scores in one
    pass, and torch's softmax. The backward calls it again on the same tensors and gets the forward's
    probabilities exactly."""
    batch, kv_heads, rows, _ = q.shape
    wide = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(wide), k.to(wide).transpose(-1, -2)).view(batch, kv_heads, groups, rows // groups, -1)
    bias = _bias(mask)
    scores = scores.mul_(scale) if bias is None else torch.add(bias[:, :, None], scores, alpha=scale)
    return scores.softmax(dim=-1)


class _GroupedAttention(torch.autograd.Function):
    """Attention of query heads grouped on their key/value head: scores and their gradient in float32 products,
    softmax in float32, the products with the probabilities and score gradients in `dtype` (as torch's flash
    kernel computes them); saves the inputs (in `dtype`) and the mask, and recomputes the probabilities in the
    backward. mask [B or 1, 1, Tq, Tk]: bool (True where attended), additive, or None."""

    @staticmethod
    def forward(ctx, query, key, value, mask, scale, dtype):
        with torch.autocast("cpu", enabled=False):
            batch, heads, length, dim = query.shape
            kv_heads = key.shape[1]
            groups = heads // kv_heads
            q = query.to(dtype).reshape(batch, kv_heads, groups * length, dim)
            k, v = key.to(dtype), value.to(dtype)
            probs = _probs(q, k, mask, scale, groups)
            out = torch.matmul(probs.to(dtype).view(batch, kv_heads, groups * length, -1), v)  # [B, Hkv, g * Tq, D]
        ctx.save_for_backward(q, k, v, mask)  # not the output: o_proj keeps its own copy of it
        ctx.scale, ctx.groups, ctx.dtypes = scale, groups, (query.dtype, key.dtype, value.dtype)
        return out.view(batch, heads, length, dim)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, mask = ctx.saved_tensors
        groups = ctx.groups
        batch, kv_heads, rows, dim = q.shape
        with torch.autocast("cpu", enabled=False):
            grad_o = grad_out.to(q.dtype).reshape(batch, kv_heads, rows, dim)
            probs = _probs(q, k, mask, ctx.scale, groups)  # float32 [B, Hkv, g, Tq, Tk], as in the forward
            grad_v = torch.matmul(probs.to(q.dtype).view(batch, kv_heads, rows, -1).transpose(-1, -2), grad_o)
            grad_p = torch.matmul(grad_o.to(probs.dtype), v.to(probs.dtype).transpose(-1, -2)).view(probs.shape)
            weighted = (probs * grad_p).sum(-1, keepdim=True)  # d score = p (d p - sum_j p_j d p_j)
            grad_s = probs.mul_(grad_p.sub_(weighted)).mul_(ctx.scale)
            grad_s = grad_s.to(q.dtype).view(batch, kv_heads, rows, -1)
            grad_q = torch.matmul(grad_s, k).view(batch, kv_heads * groups, rows // groups, dim)
            grad_k = torch.matmul(grad_s.transpose(-1, -2), q)  # sums over the group's query heads
        query_dtype, key_dtype, value_dtype = ctx.dtypes
        return grad_q.to(query_dtype), grad_k.to(key_dtype), grad_v.to(value_dtype), None, None, None
