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
from transformers.cache_utils import DynamicCache, DynamicLayer
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


class SharedPrefixCache:
    """Keys and values of a generation whose rows come in equal groups of one prompt each (GRPO's G completions of
    a prompt), for the fused float32 decode step (`LeanDecoder` on MKL's packed products): each prompt's keys and
    values once, as the model's prefill left them ([P, Hkv, W, D] a layer), and each row's generated positions in
    buffers of their own ([N, Hkv, C, D], N = P x group, rows in prompt order).

    Held per row (`preallocate`), the prompt's keys and values are G copies, and a decode step reads every copy:
    at 64 rows of 200-token prompts that is more than the step reads of the weights. Here a step reads each prompt
    once: the queries of a prompt's rows meet its keys in one product, their own positions in another, and one
    softmax spans both, so the result is the same attention, rounded differently (tested against float64).

    The rows must stay in equal groups: `batch_select_indices` keeps the finished rows out, and when the groups left
    differ in size (or the decode step leaves the fused path), `materialize()` gives the per-row cache instead."""

    shared = True

    def __init__(self, prefill: DynamicCache, group: int, capacity: int, padding: torch.Tensor | None):
        """prefill: the model's cache of the P prompts (plain dynamic layers); group: rows a prompt; capacity:
        positions to generate; padding: [P, W] bool, True at each prompt's left padding (None: none)."""
        self.prefill = prefill
        self.prefix_keys = [layer.keys.contiguous() for layer in prefill.layers]  # [P, Hkv, W, D]
        self.prefix_values = [layer.values.contiguous() for layer in prefill.layers]
        prompts, kv_heads, _, dim = self.prefix_keys[0].shape
        self.group = group
        self.padding = None if padding is None else padding[:, None, None]  # [P, 1, 1, W]
        self.keys = [k.new_empty(prompts * group, kv_heads, capacity, dim) for k in self.prefix_keys]
        self.values = [v.new_empty(prompts * group, kv_heads, capacity, dim) for v in self.prefix_values]
        self.prompt_of_row = torch.arange(prompts, device=self.keys[0].device).repeat_interleave(group)
        self.regular = True  # every prompt has `group` rows, in order
        self.length = 0

    @staticmethod
    def applies(cache) -> bool:
        """Whether a prefill cache can be shared: every layer plain dynamic, [P, Hkv, W, D]."""
        layers = getattr(cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized and layer.keys.dim() == 4
                                    for layer in layers)

    def advance(self) -> int:
        """Open the next generated position (once a decode step, before its layers); returns its index."""
        if self.length == self.keys[0].shape[2]:
            raise RuntimeError(f"SharedPrefixCache is full: it has room for {self.length} generated positions")
        self.length += 1
        return self.length - 1

    def attend(self, i: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Layer i: write the step's key and value [N, Hkv, D] at the position `advance` opened, then attend with
        query [N, H, D] (already scaled) over the row's prompt and generated positions -> [N, H * D]."""
        position = self.length - 1
        keys, values = self.keys[i], self.values[i]
        keys.select(2, position).copy_(key)
        values.select(2, position).copy_(value)
        return self._attend(i, query, keys[:, :, :self.length], values[:, :, :self.length], None)

    def _attend(self, i: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                unfilled: torch.Tensor | None) -> torch.Tensor:
        """Layer i's attention of query [N, H, D] (scaled) over each row's prompt (`prefix_keys[i]`, its padding
        masked) and its own positions keys / values [N, Hkv, L, D] (unfilled [L]: True at positions that weigh 0, or
        None) -> [N, H * D] in the query's dtype; softmax in float32."""
        prefix_keys, prefix_values = self.prefix_keys[i], self.prefix_values[i]
        prompts, kv_heads, width, dim = prefix_keys.shape
        rows, heads, _ = query.shape
        group, per_kv, length = self.group, heads // kv_heads, keys.shape[2]
        # a prompt's rows against its keys: [P * Hkv, G * g, W]
        grouped = query.view(prompts, group, kv_heads, per_kv, dim).transpose(1, 2).reshape(
            prompts * kv_heads, group * per_kv, dim)
        prompt_scores = torch.bmm(grouped, prefix_keys.view(prompts * kv_heads, width, dim).transpose(1, 2))
        if self.padding is not None:
            prompt_scores.view(prompts, kv_heads, group * per_kv, width).masked_fill_(self.padding, float("-inf"))
        # each row against its own generated positions: [N * Hkv, g, L]
        own_scores = torch.bmm(query.reshape(rows * kv_heads, per_kv, dim), keys.flatten(0, 1).transpose(1, 2))
        if unfilled is not None:
            own_scores.masked_fill_(unfilled, float("-inf"))
        scores = torch.cat((prompt_scores.view(prompts, kv_heads, group, per_kv, width).transpose(1, 2),
                            own_scores.view(prompts, group, kv_heads, per_kv, length)), dim=-1)  # [P, G, Hkv, g, W+L]
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
        from_prompt = torch.bmm(probs[..., :width].transpose(1, 2).reshape(prompts * kv_heads, group * per_kv, width),
                                prefix_values.view(prompts * kv_heads, width, dim))  # [P * Hkv, G * g, D]
        out = torch.bmm(probs[..., width:].reshape(rows * kv_heads, per_kv, length),
                        values.flatten(0, 1))  # [N * Hkv, g, D]
        out = out.view(prompts, group, kv_heads, per_kv, dim).add_(
            from_prompt.view(prompts, kv_heads, group, per_kv, dim).transpose(1, 2))
        return out.view(rows, heads * dim)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows `indices` (ascending); prompts left without rows are dropped. Rows left in unequal groups
        mark the cache irregular: `materialize()` must then replace it before the next step."""
        self.keys = [k[indices] for k in self.keys]
        self.values = [v[indices] for v in self.values]
        self.prompt_of_row = self.prompt_of_row[indices]
        counts = torch.bincount(self.prompt_of_row, minlength=self.prefix_keys[0].shape[0])
        present = counts.nonzero().squeeze(-1)
        sizes = counts[present].unique()
        if len(sizes) != 1:
            self.regular = False
            return
        if len(present) < len(counts):  # whole prompts finished: their keys and values go
            self.prefix_keys = [k[present] for k in self.prefix_keys]
            self.prefix_values = [v[present] for v in self.prefix_values]
            self.padding = None if self.padding is None else self.padding[present]
        self.group = int(sizes[0])
        self.prompt_of_row = torch.arange(len(present), device=present.device).repeat_interleave(self.group)

    def materialize(self) -> DynamicCache:
        """The same keys and values per row, as `preallocate` leaves a cache: the prefill's `DynamicCache`, each
        layer [N, Hkv, W + L, D] in a buffer with room for the positions still to generate."""
        rows = self.prompt_of_row
        for i, layer in enumerate(self.prefill.layers):
            prefix_keys, keys = self.prefix_keys[i], self.keys[i]
            width, length, capacity = prefix_keys.shape[2], self.length, keys.shape[2]
            for name, prefix, own in (("keys", prefix_keys, keys), ("values", self.prefix_values[i], self.values[i])):
                buffer = own.new_empty((own.shape[0], own.shape[1], width + capacity, own.shape[3]))
                buffer[:, :, :width] = prefix[rows]
                buffer[:, :, width:width + length] = own[:, :, :length]
                setattr(layer, "_key_buffer" if name == "keys" else "_value_buffer", buffer)
                setattr(layer, name, buffer[:, :, :width + length])
            layer.__class__ = _PreallocatedLayer
        self.keys = self.values = self.prefix_keys = self.prefix_values = []
        return self.prefill


class SharedBF16Cache(SharedPrefixCache):
    """`SharedPrefixCache` for the bf16 decode step (`LeanDecoder` under bf16 autocast), in the layout of its
    `decoder.BF16Cache`: each prompt's bf16 keys and values once ([P, Hkv, W, D] a layer), each row's generated
    positions in bf16 buffers ([N, Hkv, C, D]) that grow by `BF16Cache.CHUNK` positions and are read whole (a
    filled prefix would be a strided view, which torch's bf16 batched product copies every call), the positions not
    yet filled masked. The step writes `keys[i][:, :, advance()]` and calls `attend(i, query)`, as on a
    `BF16Cache`. Scores as `BF16Cache.attend` computes them (each a bf16 product over D), softmax in float32 over
    the prompt's and the row's positions together; the two weighted sums of values are rounded to bf16 apart and
    added, where the per-row cache rounds one."""

    def __init__(self, prefill: decoder.BF16Cache, group: int):
        """prefill: the bf16 prefill's cache of the P prompts (`LeanDecoder.prefill`); group: rows a prompt."""
        width = prefill.length
        self.prefill = None
        self.prefix_keys = [k[:, :, :width].contiguous() for k in prefill.keys]  # [P, Hkv, W, D]
        self.prefix_values = [v[:, :, :width].contiguous() for v in prefill.values]
        prompts, kv_heads, _, dim = self.prefix_keys[0].shape
        padding = prefill.masked[..., :width]  # [P, 1, 1, W]
        self.padding = padding if bool(padding.any()) else None
        self.group = group
        chunk = decoder.BF16Cache.CHUNK
        self.keys = [k.new_zeros(prompts * group, kv_heads, chunk, dim) for k in self.prefix_keys]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.unfilled = torch.ones(chunk, dtype=torch.bool, device=self.keys[0].device)  # shared by every row
        self.prompt_of_row = torch.arange(prompts, device=self.keys[0].device).repeat_interleave(group)
        self.regular = True
        self.length = 0

    @staticmethod
    def applies(cache) -> bool:
        """Whether a prefill cache can be shared: the bf16 prefill's own."""
        return type(cache) is decoder.BF16Cache

    def advance(self) -> int:
        """Open the next generated position (growing the buffers when full); returns its index in `keys`."""
        if self.length == self.unfilled.shape[0]:
            chunk = decoder.BF16Cache.CHUNK
            self.keys = [torch.cat((k, k.new_zeros(*k.shape[:2], chunk, k.shape[3])), 2) for k in self.keys]
            self.values = [torch.cat((v, v.new_zeros(*v.shape[:2], chunk, v.shape[3])), 2) for v in self.values]
            self.unfilled = torch.cat((self.unfilled, self.unfilled.new_ones(chunk)))
        self.unfilled[self.length] = False
        self.length += 1
        return self.length - 1

    def attend(self, i: int, query: torch.Tensor) -> torch.Tensor:
        """Layer i's single-token attention: query [N, H, D] bf16, already scaled -> [N, H * D] bf16."""
        return self._attend(i, query, self.keys[i], self.values[i], self.unfilled)

    def materialize(self) -> decoder.BF16Cache:
        """The same keys and values per row, as a `decoder.BF16Cache` (the prompt's positions first, padding and
        unfilled positions masked) with the same room left."""
        rows = self.prompt_of_row
        width = self.prefix_keys[0].shape[2]
        cache = decoder.BF16Cache.__new__(decoder.BF16Cache)
        cache.keys = [torch.cat((prefix[rows], own), 2)
                      for prefix, own in zip(self.prefix_keys, self.keys, strict=True)]
        cache.values = [torch.cat((prefix[rows], own), 2)
                        for prefix, own in zip(self.prefix_values, self.values, strict=True)]
        padding = (self.padding[rows] if self.padding is not None
                   else self.unfilled.new_zeros(len(rows), 1, 1, width))
        cache.masked = torch.cat((padding, self.unfilled.expand(len(rows), 1, 1, -1)), -1)
        cache.length = width + self.length
        self.keys = self.values = self.prefix_keys = self.prefix_values = []
        return cache


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
