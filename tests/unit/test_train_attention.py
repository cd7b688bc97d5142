"""The trainer's CPU attention for short sequences (grpokit/models/attention.py): the maths against a plain float64
reference, agreement with torch's SDPA in bf16, and where it is (and is not) used."""

import contextlib

import pytest
import torch
from transformers.integrations import sdpa_attention

from grpokit.models import attention, logprobs
from grpokit.models.attention import _GroupedAttention

LOW = torch.finfo(torch.float32).min


class _Module(torch.nn.Module):
    is_causal = True

    def __init__(self, groups: int = 3):
        super().__init__()
        self.num_key_value_groups = groups  # read by transformers' SDPA function


def _reference(query, key, value, attended, scale):
    """Plain float64 attention: every query head against its own copy of its key/value head, softmax over the
    attended keys only."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~attended, float("-inf"))
    return scores.softmax(-1) @ value


def _inputs(dtype=torch.float64, batch=2, heads=6, kv_heads=2, length=5, keys=9, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    return make(batch, heads, length, dim), make(batch, kv_heads, keys, dim), make(batch, kv_heads, keys, dim)


def _padded_causal_mask(batch=2, length=5, keys=9, padding=(0, 3)) -> torch.Tensor:
    """[B, 1, Tq, Tk] bool, True where attended: causal with the queries at the last positions, row b's first
    padding[b] keys masked; row 1's first query (position 4) sees keys 0-4, of which 0-2 are padding."""
    causal = torch.ones(length, keys, dtype=torch.bool).tril(keys - length)
    mask = causal[None, None].repeat(batch, 1, 1, 1)
    for b, pad in enumerate(padding):
        mask[b, :, :, :pad] = False
    return mask


def test_grouped_attention_matches_a_float64_reference_in_values_and_gradients():
    query, key, value = _inputs()
    mask = _padded_causal_mask()
    mask[1, 0, 0] = False  # a query row with no key attended
    bias = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, LOW)
    scale = 0.3
    out = _GroupedAttention.apply(query, key, value, bias, scale, torch.float64)
    live = mask.any(-1)[:, :, :, None].expand(-1, query.shape[1], -1, query.shape[-1])  # [B, H, Tq, D]
    weights = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad((out * weights * live).sum(), (query, key, value))

    every = mask.clone()
    every[1, 0, 0] = True  # the reference has no answer for a row with nothing attended: its loss weight is 0 here
    ref = _reference(query, key, value, every, scale)
    ref_grads = torch.autograd.grad((ref * weights * live).sum(), (query, key, value))
    torch.testing.assert_close(out[live], ref[live], rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # the row with no key attended: finite, the mean of its kv head's values (as if all were attended)
    torch.testing.assert_close(out[1, 0, 0], value[1, 0].mean(0), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(out).all()


def test_grouped_attention_gradients_pass_gradcheck():
    query, key, value = _inputs(batch=1, heads=4, kv_heads=2, length=3, keys=4, dim=3, seed=1)
    bias = torch.zeros(1, 1, 3, 4, dtype=torch.float64).masked_fill(~_padded_causal_mask(1, 3, 4, (1,)), LOW)
    assert torch.autograd.gradcheck(lambda q, k, v: _GroupedAttention.apply(q, k, v, bias, 0.7, torch.float64),
                                    (query, key, value))


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "float16"])
def test_low_precision_agrees_with_torch_sdpa(mask_kind, monkeypatch):
    """bf16 under autocast (float16 inputs without it), against transformers' SDPA on the same inputs."""
    query, key, value = _inputs(torch.float32, batch=3, heads=9, kv_heads=3, length=24, keys=40, dim=16, seed=2)
    padded = _padded_causal_mask(3, 24, 40, (0, 5, 11))
    mask = {"none": None, "bool": padded, "additive": torch.zeros(3, 1, 24, 40).masked_fill(~padded, float("-inf")),
            "float16": padded}[mask_kind]
    if mask_kind == "none":  # transformers hands SDPA no mask when it is causal over equal lengths
        key, value = (t.detach()[:, :, :24].clone().requires_grad_() for t in (key, value))
    if mask_kind == "float16":
        query, key, value = (t.detach().half().requires_grad_() for t in (query, key, value))
    calls = []
    apply = _GroupedAttention.apply
    monkeypatch.setattr(_GroupedAttention, "apply", lambda *a: calls.append(a[-1]) or apply(*a))
    weights = torch.randn(3, 24, 9, 16)
    results = []
    for fn in (attention._attention, sdpa_attention.sdpa_attention_forward):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mask_kind != "float16"):
            out, _ = fn(_Module(), query, key, value, mask, scaling=0.25)
        grads = torch.autograd.grad((out.float() * weights).sum(), (query, key, value))
        results.append((out, grads))
    assert calls == [torch.float16 if mask_kind == "float16" else torch.bfloat16]  # the first ran here, SDPA not
    (out, grads), (want, want_grads) = results
    assert out.shape == want.shape == (3, 24, 9, 16) and out.is_contiguous()
    torch.testing.assert_close(out.float(), want.float(), rtol=0, atol=3e-2)  # low-precision products
    for got, ref in zip(grads, want_grads, strict=True):
        assert ((got.float() - ref.float()).norm() / ref.float().norm()) < 2e-2


def test_large_scores_are_not_rounded_to_bf16():
    """Scores of 20-60 (attention sinks in trained models): a bf16-rounded score is off by up to 0.25, which moves
    the probabilities by up to 25%; the scores here are float32 products of the bf16 inputs, as in torch's kernel."""
    query, key, value = _inputs(torch.float64, batch=2, heads=4, kv_heads=2, length=16, keys=16, dim=16, seed=4)
    with torch.no_grad():
        query.mul_(4)
        key.mul_(4)
    rounded = [t.detach().to(torch.bfloat16).double() for t in (query, key, value)]  # what both sides multiply
    causal = torch.ones(16, 16, dtype=torch.bool).tril()[None, None]
    want = _reference(*rounded, causal, 0.25)
    scores = (rounded[0] @ rounded[1].repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    assert scores.masked_select(causal).abs().max() > 20  # the case this test is about
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention._attention(_Module(2), query.float(), key.float(), value.float(), None, scaling=0.25)
    # only the probabilities' rounding to bf16 before the product with the values remains: about 2^-9 relative
    torch.testing.assert_close(out.transpose(1, 2).double(), want, rtol=0, atol=2e-2)


def test_mask_none_follows_sdpa_is_causal_and_unequal_lengths_go_to_sdpa(monkeypatch):
    query, key, value = _inputs(torch.float64, length=6, keys=6)
    full = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    causal = full.tril()
    for module, kwargs, attended in ((_Module(), {}, causal), (_Module(), {"is_causal": False}, full),
                                     (type("NotCausal", (_Module,), {"is_causal": False})(), {}, full),
                                     (type("NotCausal", (_Module,), {"is_causal": False})(), {"is_causal": True},
                                      causal)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = attention._attention(module, query.float(), key.float(), value.float(), None, scaling=0.3,
                                          **kwargs)
        want = _reference(*(t.detach().to(torch.bfloat16).double() for t in (query, key, value)), attended, 0.3)
        torch.testing.assert_close(out.transpose(1, 2).double(), want, rtol=0, atol=2e-2)
    sdpa_calls = []
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: sdpa_calls.append(a[2].shape) or "sdpa")
    query, key, value = _inputs(torch.bfloat16, length=4, keys=9)  # no mask, more keys than queries: SDPA crops
    assert attention._attention(_Module(), query, key, value, None) == "sdpa" and len(sdpa_calls) == 1


def _logps(model, input_ids, attention_mask, completion, bf16: bool, switch: bool, share: bool = True):
    model.zero_grad(set_to_none=True)
    patch = contextlib.nullcontext() if switch else _no_switch()
    with patch, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        lp, _ = logprobs.completion_logps(model, input_ids, attention_mask, completion, 1.0, 1024, share)
    keep = attention_mask[:, -completion:].bool()
    (lp * keep).sum().backward()
    return lp.detach()[keep], torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@contextlib.contextmanager
def _no_switch():
    original = attention.training_attention
    attention.training_attention = lambda model: contextlib.nullcontext(False)
    try:
        yield
    finally:
        attention.training_attention = original


def _batch(vocab: int):
    gen = torch.Generator().manual_seed(3)
    prompts = torch.randint(3, vocab, (2, 1, 10), generator=gen).expand(-1, 3, -1).reshape(6, 10)  # 2 groups of 3
    ids = torch.cat([prompts, torch.randint(3, vocab, (6, 12), generator=gen)], dim=1)
    mask = torch.ones_like(ids)
    mask[3:, :4] = 0  # the second group's prompt is left-padded
    mask[0, -5:] = 0  # a completion that ended early
    return ids, mask


@pytest.mark.parametrize("share", [True, False])
def test_log_probs_in_bf16_take_it_and_agree_with_sdpa(tiny_model, monkeypatch, share):
    model, tokenizer = tiny_model
    model.train()
    ids, mask = _batch(len(tokenizer))
    calls = []
    apply = _GroupedAttention.apply
    monkeypatch.setattr(_GroupedAttention, "apply", lambda *a: calls.append(a[0].shape) or apply(*a))
    got, got_grad = _logps(model, ids, mask, 12, bf16=True, switch=True, share=share)
    # shared: each layer's prompt forward ([2 prompts, 4 heads, 10 positions]) and completion forward; whole: one
    assert len(calls) == (4 if share else 2), calls
    assert model.config._attn_implementation == "sdpa"  # restored
    calls.clear()
    want, want_grad = _logps(model, ids, mask, 12, bf16=True, switch=False, share=share)
    assert not calls
    assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
    torch.testing.assert_close(got, want, rtol=0, atol=5e-2)
    assert (got_grad - want_grad).norm() / want_grad.norm() < 3e-2


def test_float32_keeps_torch_sdpa_bit_for_bit(tiny_model, monkeypatch):
    model, tokenizer = tiny_model
    model.train()
    ids, mask = _batch(len(tokenizer))
    calls = []
    monkeypatch.setattr(_GroupedAttention, "apply", lambda *a: calls.append(a) or None)
    got, got_grad = _logps(model, ids, mask, 12, bf16=False, switch=True)
    want, want_grad = _logps(model, ids, mask, 12, bf16=False, switch=False)
    assert not calls
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


def test_long_sequences_odd_masks_and_checkpointing_keep_torch_sdpa(tiny_model, monkeypatch):
    sdpa_calls = []
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: sdpa_calls.append(a[1].shape) or "sdpa")
    query, key, value = _inputs(torch.bfloat16, length=8, keys=8)
    module = _Module()
    assert attention._attention(module, query, key, value, None)[0].shape == (2, 8, 6, 8)  # taken
    monkeypatch.setattr(attention, "_MAX_SCORES_PER_HEAD", 63)  # 8 x 8 scores per head: too many now
    assert attention._attention(module, query, key, value, None) == "sdpa"
    monkeypatch.setattr(attention, "_MAX_SCORES_PER_HEAD", 64)
    assert attention._attention(module, query, key, value, torch.ones(2, 6, 8, 8, dtype=torch.bool)) == "sdpa"
    assert attention._attention(module, query, key, value, None, dropout=0.1) == "sdpa"
    assert attention._attention(module, query, key, value, None, softcap=30.0) == "sdpa"
    assert attention._attention(module, query[:, :, :1], key, value, None) == "sdpa"  # one query: decode's business
    assert attention._attention(module, query.float(), key.float(), value.float(), None) == "sdpa"  # float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts float32 only: float64 stays float64 (SDPA)
        assert attention._attention(module, query.double(), key.double(), value.double(), None) == "sdpa"
        assert attention._attention(module, query.float(), key.float(), value.float(), None)[0].shape == (2, 8, 6, 8)
    assert len(sdpa_calls) == 7

    model, _ = tiny_model
    with attention.training_attention(model) as on:
        assert on and model.config._attn_implementation == attention.IMPLEMENTATION
    model.activation_checkpointing_enable()
    with attention.training_attention(model) as on:
        assert not on and model.config._attn_implementation == "sdpa"
