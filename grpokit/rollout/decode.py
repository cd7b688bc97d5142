"""Decoding helpers for the in-process sampler: a KV cache written in place, and single-token attention.

transformers' `DynamicCache` grows each layer's keys and values with `torch.cat`, copying the whole
cache every step (at 64 rows x 30 layers of SmolLM2-135M about an eighth of a decode step on CPU).
`preallocate(cache, extra)` gives each plain dynamic layer a buffer with room for `extra` more
positions; `update` then writes the new position in place and returns views of the filled part.

For one query token, torch's CPU SDPA kernel spends most of its time on setup (about 0.6-0.9 ms
per call at 64 rows where two batched matmuls and a softmax take 0.2-0.5 ms). `decode_attention()`
registers an attention implementation that computes single-token attention on CPU with the key/value
heads shared by their query heads (no `repeat_kv` copy), and hands every other call (prefill, CUDA,
softcapping, attention sinks) to transformers' SDPA function unchanged; the model is switched to it
only inside the context and only where it was on "sdpa".
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from grpokit.models import attention, decoder

IMPLEMENTATION = "grpokit_decode"


class _PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views of [N, H, capacity, D] buffers, filled in place."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        length, new = self.keys.shape[-2], key_states.shape[-2]
        if length + new > self._key_buffer.shape[-2]:  # out of room: grow like DynamicLayer
            self.__class__ = DynamicLayer
            del self._key_buffer, self._value_buffer
            return DynamicLayer.update(self, key_states, value_states, *args, **kwargs)
        self._key_buffer[:, :, length:length + new] = key_states
        self._value_buffer[:, :, length:length + new] = value_states
        self.keys = self._key_buffer[:, :, :length + new]
        self.values = self._value_buffer[:, :, :length + new]
        return self.keys, self.values

    def append_one(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One position's key and value [N, Hkv, D] written in place (the lean decoder's step); returns every filled
        position's keys and values as [N * Hkv, L, D] views."""
        length = self.keys.shape[-2]
        if length == self._key_buffer.shape[-2]:
            keys, values = self.update(key[:, :, None], value[:, :, None])
            return keys.flatten(0, 1), values.flatten(0, 1)
        self._key_buffer.select(2, length).copy_(key)
        self._value_buffer.select(2, length).copy_(value)
        self.keys = self._key_buffer[:, :, :length + 1]
        self.values = self._value_buffer[:, :, :length + 1]
        return self.keys.flatten(0, 1), self.values.flatten(0, 1)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._key_buffer = self._key_buffer[indices]
        self._value_buffer = self._value_buffer[indices]
        length = self.keys.shape[-2]
        self.keys, self.values = self._key_buffer[:, :, :length], self._value_buffer[:, :, :length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._key_buffer = self._key_buffer.repeat_interleave(repeats, dim=0)
        self._value_buffer = self._value_buffer.repeat_interleave(repeats, dim=0)
        length = self.keys.shape[-2]
        self.keys, self.values = self._key_buffer[:, :, :length], self._value_buffer[:, :, :length]


def preallocate(cache, extra: int) -> int:
    """Give each plain `DynamicLayer` of `cache` room for `extra` more positions; returns how many layers got it.

    Other layer types (sliding windows, quantized, static) are left as they are."""
    converted = 0
    for layer in getattr(cache, "layers", []):
        if type(layer) is not DynamicLayer or not layer.is_initialized or layer.keys.dim() != 4:
            continue
        length = layer.keys.shape[-2]
        for name in ("keys", "values"):
            filled = getattr(layer, name)
            buffer = filled.new_empty((*filled.shape[:2], length + extra, filled.shape[-1]))
            buffer[:, :, :length] = filled
            setattr(layer, "_key_buffer" if name == "keys" else "_value_buffer", buffer)
            setattr(layer, name, buffer[:, :, :length])
        layer.__class__ = _PreallocatedLayer
        converted += 1
    return converted


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' attention contract: query [B, H, 1, D], key/value [B, Hkv, L, D] -> ([B, 1, H, D], None)."""
    if (query.shape[2] != 1 or query.device.type != "cpu" or dropout != 0.0 or kwargs.get("softcap") is not None
            or kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None or key.shape[1] == 0
            or query.shape[1] % key.shape[1] or key.shape[-1] != value.shape[-1]
            or (attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, _, dim = query.shape
    scale = dim ** -0.5 if scaling is None else scaling
    mask = None
    if attention_mask is not None:
        mask = attention_mask[..., -1:, :]  # [B or 1, 1, 1, L]: shared by all heads
        mask = ~mask if mask.dtype == torch.bool else mask  # bool: True where attended; attend_one's: where masked
    return decoder.attend_one(query[:, :, 0], key, value, scale, mask).reshape(batch, 1, heads, dim), None


AttentionInterface.register(IMPLEMENTATION, _attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def decode_attention(model: torch.nn.Module):
    """A context inside which the model's configs on "sdpa" use `_attention`; it yields whether any was switched."""
    return attention.switched(model, IMPLEMENTATION)
