"""The sampler's decode helpers (grpokit.rollout.decode): single-token attention against a float64 reference, the
KV cache written in place against transformers' growing one, and the engine with and without them."""

import contextlib
import math

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from grpokit.models.logprobs import returned_cache, with_cache
from grpokit.rollout import decode
from grpokit.rollout.base import SamplingParams
from grpokit.rollout.torch_engine import TorchEngine


class _Module:  # what the attention function reads from the attention module
    is_causal = True

    def __init__(self, groups):
        self.num_key_value_groups = groups


def _reference(query, key, value, mask, scale):
    """float64 softmax(q k^T * scale + mask) v with key/value heads repeated; [B, H, 1, D] -> [B, 1, H, D]."""
    q, k, v = query.double(), key.double(), value.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * scale  # [B, H, 1, L]
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.double()
    return (scores.softmax(-1) @ v).transpose(1, 2)


def _inputs(seed, batch, heads, kv_heads, length, dim=16, capacity=None):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, 1, heads, dim, generator=g).transpose(1, 2)  # as the model's view of q_proj's output
    buffers = [torch.randn(batch, kv_heads, capacity or length, dim, generator=g) for _ in range(2)]
    key, value = (b[:, :, :length] for b in buffers)  # views of a longer buffer, as the preallocated cache gives
    pad = torch.randint(0, length - 1, (batch,), generator=g)  # left padding per row
    mask = (torch.arange(length)[None, :] >= pad[:, None])[:, None, None, :]  # [B, 1, 1, L]
    return query, key, value, mask


@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (4, 4), (8, 1)])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
@pytest.mark.parametrize("seed", [0, 1])
def test_single_token_attention_matches_float64(heads, kv_heads, mask_kind, seed):
    query, key, value, mask = _inputs(seed, batch=5, heads=heads, kv_heads=kv_heads, length=13, capacity=20)
    if mask_kind == "float":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    elif mask_kind == "none":
        mask = None
    out, weights = decode._attention(_Module(heads // kv_heads), query, key, value, mask, scaling=0.3)
    assert weights is None and out.shape == (5, 1, heads, 16)
    torch.testing.assert_close(out.double(), _reference(query, key, value, mask, 0.3), rtol=0, atol=2e-6)


def test_default_scale_is_one_over_sqrt_dim():
    query, key, value, mask = _inputs(3, batch=2, heads=4, kv_heads=2, length=7)
    out, _ = decode._attention(_Module(2), query, key, value, mask)
    torch.testing.assert_close(out.double(), _reference(query, key, value, mask, 16 ** -0.5), rtol=0, atol=2e-6)


@pytest.mark.parametrize("case", ["prefill", "softcap", "dropout", "position_bias", "per-head mask"])
def test_other_calls_go_to_transformers_sdpa(case, monkeypatch):
    calls = []
    monkeypatch.setattr(decode, "sdpa_attention_forward", lambda *args, **kwargs: calls.append(kwargs) or "sdpa")
    query, key, value, mask = _inputs(0, batch=2, heads=4, kv_heads=2, length=6)
    kwargs = {"scaling": 0.5}
    if case == "prefill":
        query = torch.randn(2, 4, 3, 16)
    elif case == "softcap":
        kwargs["softcap"] = 30.0
    elif case == "dropout":
        kwargs["dropout"] = 0.1
    elif case == "position_bias":
        kwargs["position_bias"] = torch.zeros(1, 4, 1, 6)
    else:
        mask = mask.expand(2, 4, 1, 6)
    assert decode._attention(_Module(2), query, key, value, mask, **kwargs) == "sdpa"
    assert len(calls) == 1 and calls[0]["scaling"] == 0.5


def test_decode_attention_switches_sdpa_models_only_and_restores(tiny_model):
    model, _ = tiny_model
    assert model.config._attn_implementation == "sdpa"
    with decode.decode_attention(model) as switched:
        assert switched and model.config._attn_implementation == decode.IMPLEMENTATION
        assert all(layer.self_attn.config._attn_implementation == decode.IMPLEMENTATION for layer in model.model.layers)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), decode.decode_attention(model):
        raise RuntimeError("a failure inside generation")
    assert model.config._attn_implementation == "sdpa"
    model.config._attn_implementation = "eager"
    with decode.decode_attention(model) as switched:
        assert not switched and model.config._attn_implementation == "eager"


def test_model_outputs_are_unchanged_under_decode_attention(tiny_model):
    """A prefill and one decode step through the model: logits under the decode implementation equal SDPA's."""
    model, tokenizer = tiny_model
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    attention = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])

    def run():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=attention, **with_cache(model, cache), use_cache=True)
        step = model(input_ids=torch.tensor([[9], [9]]), attention_mask=torch.cat([attention, torch.ones(2, 1,
                     dtype=torch.long)], 1), **with_cache(model, returned_cache(out)), use_cache=True)
        return out.logits, step.logits

    with torch.no_grad():
        want = run()
        with decode.decode_attention(model):
            got = run()
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)  # the prefill is SDPA's itself
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


def _prefilled(model, batch=3, length=4):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.arange(1, batch * length + 1).view(batch, length), **with_cache(model, cache),
              use_cache=True)
    return cache


def test_preallocated_cache_holds_what_the_growing_cache_holds(tiny_model):
    model, _ = tiny_model
    grown, filled = _prefilled(model), _prefilled(model)
    assert decode.preallocate(filled, extra=5) == len(filled.layers)
    assert all(type(layer) is decode._PreallocatedLayer for layer in filled.layers)
    g = torch.Generator().manual_seed(0)
    shape = grown.layers[0].keys.shape
    for step in range(5):
        if step == 2:  # rows drop out mid-way, as the sampler compacts finished rows
            for cache in (grown, filled):
                cache.batch_select_indices(torch.tensor([0, 2]))
        new = [torch.randn(shape[0] if step < 2 else 2, shape[1], 1, shape[3], generator=g) for _ in range(2)]
        for index, (a, b) in enumerate(zip(grown.layers, filled.layers, strict=True)):
            want = a.update(*new)
            got = b.update(*new)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"layer {index}, step {step}"
        assert filled.get_seq_length() == grown.get_seq_length() == 4 + step + 1
    layer = filled.layers[0]
    assert layer.keys.data_ptr() == layer._key_buffer.data_ptr()  # views of the buffer: written in place


def test_preallocated_cache_repeats_rows_and_grows_past_its_room(tiny_model):
    model, _ = tiny_model
    grown, filled = _prefilled(model, batch=2), _prefilled(model, batch=2)
    decode.preallocate(filled, extra=1)
    for cache in (grown, filled):
        cache.batch_repeat_interleave(3)
    shape = grown.layers[0].keys.shape
    for _ in range(3):  # two more positions than the room: the layer falls back to growing
        new = [torch.randn(shape[0], shape[1], 1, shape[3]) for _ in range(2)]
        for a, b in zip(grown.layers, filled.layers, strict=True):
            want, got = a.update(*new), b.update(*new)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(type(layer) is DynamicLayer for layer in filled.layers)


def test_preallocate_leaves_other_layer_types_alone(tiny_model):
    model, _ = tiny_model
    cache = _prefilled(model)
    sliding = DynamicSlidingWindowLayer(sliding_window=8)
    sliding.update(torch.zeros(3, 2, 4, 8), torch.zeros(3, 2, 4, 8))
    cache.layers.append(sliding)
    assert decode.preallocate(cache, extra=2) == len(cache.layers) - 1
    assert type(cache.layers[-1]) is DynamicSlidingWindowLayer


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_engine_gives_the_same_completions_without_the_decode_helpers(tiny_model, monkeypatch, temperature):
    """The same rollout with transformers' growing cache and SDPA: greedy tokens identical, sampled ones too
    (same uniforms), log-probs within float32 rounding."""
    model, tokenizer = tiny_model
    prompts = [tokenizer(t)["input_ids"] for t in ("What is 2 + 3?", "Hi", "A longer prompt about 17 - 4.")]
    params = SamplingParams(max_tokens=12, temperature=temperature, seed=5)
    engine = TorchEngine(model, 0)
    used = []
    real_preallocate = decode.preallocate
    monkeypatch.setattr(decode, "preallocate", lambda cache, extra: used.append(real_preallocate(cache, extra)))
    fast = engine.generate(prompts, 4, params)
    assert used and used[0] == model.config.num_hidden_layers
    monkeypatch.setattr(decode, "preallocate", lambda cache, extra: 0)
    monkeypatch.setattr(decode, "decode_attention", lambda model: contextlib.nullcontext(False))
    plain = engine.generate(prompts, 4, params)
    assert fast.completion_ids == plain.completion_ids and fast.finish_reasons == plain.finish_reasons
    for a, b in zip(fast.sampler_logps, plain.sampler_logps, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)
