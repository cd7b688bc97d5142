"""The sampler's lean forward (grpokit.models.decoder): float32 bit for bit as the model's own forward, bf16 within
rounding of the trainer's autocast recompute, and the models it must leave to transformers."""

from __future__ import annotations

import copy
import platform
from unittest import mock

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from grpokit.algo.batches import pack
from grpokit.models import cpu_linear, decoder
from grpokit.models.logprobs import completion_logps
from grpokit.rollout import torch_engine
from grpokit.rollout.base import SamplingParams
from grpokit.rollout.torch_engine import TorchEngine
from tests.conftest import build_tokenizer

BF16 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not torch.backends.mkldnn.is_available()
                          or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                          reason="this CPU's oneDNN has no bf16: bf16 generation takes autocast's own path")


def _model(kind: str, *, tied: bool = False, seed: int = 0):
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=tied, eos_token_id=tokenizer.eos_token_id, pad_token_id=None, bos_token_id=None)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif kind == "qwen2":  # biases on the query/key/value projections
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:  # qwen3: per-head norms of queries and keys, head_dim set apart from hidden / heads
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16))
    with torch.no_grad():  # random norms and biases, so that the paths that read them are exercised
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.3)
    return model.eval(), tokenizer


PROMPTS = ("What is 2 + 3?", "Hi", "A longer prompt about 17 - 4.")


def _rollouts(model, tokenizer, params, n=4, **kwargs):
    prompts = [tokenizer(t)["input_ids"] for t in PROMPTS]
    lean = TorchEngine(model, 0).generate(prompts, n, params, **kwargs)
    with mock.patch.object(torch_engine, "lean_mode", lambda m: None):
        plain = TorchEngine(model, 0).generate(prompts, n, params, **kwargs)
    return prompts, lean, plain


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_float32_generation_equals_the_models_own_forward_bit_for_bit(kind, temperature):
    """Same tokens, same log-probs to the last bit, same finish reasons; rows finish at EOS (the batch compacts)."""
    model, tokenizer = _model(kind, tied=kind == "qwen3")
    steps = []
    real = decoder.LeanDecoder.step
    with mock.patch.object(decoder.LeanDecoder, "step", lambda self, *a: steps.append(1) or real(self, *a)):
        _, lean, plain = _rollouts(model, tokenizer, SamplingParams(max_tokens=24, temperature=temperature, seed=7,
                                                                    stop_token_ids=[tokenizer.eos_token_id]))
    assert steps  # the lean path ran
    assert lean.completion_ids == plain.completion_ids and lean.finish_reasons == plain.finish_reasons
    assert lean.sampler_logps == plain.sampler_logps


def test_float32_step_logits_equal_the_models_forward_with_padding():
    """One decode step on its own: logits of left-padded rows equal the model's forward over the same cache."""
    from transformers import DynamicCache

    from grpokit.rollout import decode

    model, tokenizer = _model("llama")
    ids = [tokenizer(t)["input_ids"] for t in PROMPTS]
    width = max(map(len, ids))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in ids])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    token, nxt = torch.tensor([5, 9, 11]), positions[:, -1] + 1
    full = torch.cat([attention, torch.ones(3, 1, dtype=torch.long)], dim=1)
    with torch.no_grad(), decode.decode_attention(model):
        caches = []
        for _ in range(2):
            cache = DynamicCache(config=model.config)
            model(input_ids=input_ids, attention_mask=attention, position_ids=positions, cache=cache)
            decode.preallocate(cache, 4)
            caches.append(cache)
        expected = model(input_ids=token[:, None], attention_mask=full, position_ids=nxt[:, None],
                         cache=caches[0]).logits[:, -1]
        got = decoder.LeanDecoder(model, bf16=False).step(token, nxt, caches[1], (attention == 0)[:, None, None])
    assert torch.equal(got, expected)


def test_float32_on_onednn_linears_is_unchanged_too():
    """With the linear layers on oneDNN's packed weights (cpu_linear onednn), the lean path calls the same layers."""
    if not cpu_linear.onednn_available():
        pytest.skip("no oneDNN linear op in this torch build")
    model, tokenizer = _model("llama")
    cpu_linear.use_onednn(model)
    _, lean, plain = _rollouts(model, tokenizer, SamplingParams(max_tokens=12, temperature=0.8, seed=2))
    assert lean.completion_ids == plain.completion_ids and lean.sampler_logps == plain.sampler_logps


# torch's x86-64 wheels ship MKL's packed GEMM (test_cpu_linear.py fails if it is missing there): only other
# machines skip, never an x86-64 one whose op broke
MKL = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                         reason="MKL's packed GEMM is only required of torch's x86-64 builds")


def _one_step(model, tokenizer, token, make_decoder):
    """Prefill the prompts (left padded) on the model and take one decode step with `make_decoder()`'s step ->
    (its float32 logits [3, V], the float64 model's logits of the same position)."""
    from transformers import DynamicCache

    from grpokit.rollout import decode

    ids = [tokenizer(t)["input_ids"] for t in PROMPTS]
    width = max(map(len, ids))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in ids])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    nxt = positions[:, -1] + 1
    with torch.no_grad(), decode.decode_attention(model):
        cache = DynamicCache(config=model.config)
        model(input_ids=input_ids, attention_mask=attention, position_ids=positions, cache=cache)
        decode.preallocate(cache, 4)
        got = make_decoder().step(token, nxt, cache, (attention == 0)[:, None, None])
    reference = copy.deepcopy(model).double()
    full = torch.cat([attention, torch.ones(3, 1, dtype=torch.long)], dim=1)
    with torch.no_grad():
        want = reference(input_ids=torch.cat([input_ids, token[:, None]], dim=1), attention_mask=full,
                         position_ids=torch.cat([positions, nxt[:, None]], dim=1)).logits[:, -1]
    return got, want


@MKL
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("packed_rows", [3, 4, 5])  # 3 rows: as packed for; 4, 5: padded with zeros to them
def test_float32_step_on_fused_mkl_products_matches_float64(kind, packed_rows, monkeypatch):
    """The float32 step on MKL's packed GEMM (cpu_linear auto on Intel CPUs): fused query/key/value and gate/up
    products (Qwen2's biases, Qwen3's per-head norms), queries and keys rotated together, over left padding: its
    logits are the float64 model's within float32 rounding, as close as the model's own float32 forward is. The
    decoder holds one packed copy per fused product and none of the model's layers changes class."""
    monkeypatch.setattr(cpu_linear, "AUTO_MIN_WEIGHT", 0)  # the tiny model's layers are below the size threshold
    model, tokenizer = _model(kind, tied=kind == "qwen3")
    token = torch.tensor([5, 9, 11])
    lean, products = [], []
    real = cpu_linear._mkl_product
    monkeypatch.setattr(cpu_linear, "_mkl_product", lambda a, *rest: products.append(a.shape[0]) or real(a, *rest))
    got, want = _one_step(model, tokenizer, token,
                          lambda: lean.append(decoder.LeanDecoder(model, bf16=False, mkl_rows=packed_rows)) or lean[0])
    assert lean[0].mkl is not None and len(lean[0].mkl) == 4 * 2 + 1 and lean[0].mkl_rows == packed_rows
    assert products == [packed_rows] * 9, products  # every product of the step, on rows padded to those packed for
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    plain, _ = _one_step(model, tokenizer, token, lambda: decoder.LeanDecoder(model, bf16=False))
    assert len(products) == 9
    error, own_error = (got.double() - want).abs().max().item(), (plain.double() - want).abs().max().item()
    assert error <= max(4 * own_error, 1e-5), (error, own_error)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@MKL
def test_fused_step_writes_into_any_cache_layer(monkeypatch):
    """The fused step writes each layer's new key and value in place where the cache was preallocated with room,
    and through the layer's own `update` where it has no room left or was never preallocated: the same logits and
    the same keys and values, one position longer, in all three."""
    from transformers import DynamicCache, DynamicLayer

    from grpokit.rollout import decode

    monkeypatch.setattr(cpu_linear, "AUTO_MIN_WEIGHT", 0)
    model, tokenizer = _model("llama", tied=False)
    ids = [tokenizer(t)["input_ids"] for t in PROMPTS]
    width = max(map(len, ids))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in ids])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    results = []
    for room in (4, 0, None):
        with torch.no_grad(), decode.decode_attention(model):
            cache = DynamicCache(config=model.config)
            model(input_ids=input_ids, attention_mask=attention, position_ids=positions, cache=cache)
            if room is not None:
                decode.preallocate(cache, room)
            lean = decoder.LeanDecoder(model, bf16=False, mkl_rows=3)
            logits = lean.step(torch.tensor([5, 9, 11]), positions[:, -1] + 1, cache, (attention == 0)[:, None, None])
        kinds = {type(layer) for layer in cache.layers}
        assert kinds == ({decode._PreallocatedLayer} if room == 4 else {DynamicLayer}), (room, kinds)
        assert all(layer.keys.shape[-2] == layer.values.shape[-2] == width + 1 for layer in cache.layers)
        results.append((logits, [(layer.keys, layer.values) for layer in cache.layers]))
    (logits, kv), others = results[0], results[1:]
    for other_logits, other_kv in others:
        torch.testing.assert_close(other_logits, logits, rtol=1e-6, atol=1e-6)
        for (k, v), (k2, v2) in zip(kv, other_kv, strict=True):
            torch.testing.assert_close(k2, k, rtol=0, atol=0)
            torch.testing.assert_close(v2, v, rtol=0, atol=0)


@MKL
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_shared_prompt_keys_give_the_per_row_caches_attention(kind, monkeypatch):
    """The fused step over a `SharedPrefixCache` (each prompt's keys and values once for its rows) gives the logits
    of the same step over per-row caches within float32 rounding, over left padding, step after step: while the
    groups stay equal (rows finishing in every group, a whole prompt finishing), and after rows left in unequal
    groups turn it into per-row caches (`materialize`), which then hold the per-row run's keys and values."""
    from transformers import DynamicCache

    from grpokit.rollout import decode

    monkeypatch.setattr(cpu_linear, "AUTO_MIN_WEIGHT", 0)
    model, tokenizer = _model(kind, tied=kind == "qwen3")
    ids = [tokenizer(t)["input_ids"] for t in PROMPTS]
    width, group = max(map(len, ids)), 3
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in ids])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    gen = torch.Generator().manual_seed(1)
    caches = []
    with torch.no_grad(), decode.decode_attention(model):
        for _ in range(2):
            cache = DynamicCache(config=model.config)
            model(input_ids=input_ids, attention_mask=attention, position_ids=positions, cache=cache)
            caches.append(cache)
        assert decode.SharedPrefixCache.applies(caches[0])
        shared = decode.SharedPrefixCache(caches[0], group, 8, attention == 0)
        rows = caches[1]
        rows.batch_repeat_interleave(group)
        decode.preallocate(rows, 8)
        pad = (attention == 0).repeat_interleave(group, dim=0)[:, None, None]
        lean = decoder.LeanDecoder(model, bf16=False, mkl_rows=9)
        attends = []
        real = decode.SharedPrefixCache.attend
        monkeypatch.setattr(decode.SharedPrefixCache, "attend", lambda self, *a: attends.append(1) or real(self, *a))
        position = positions[:, -1].repeat_interleave(group) + 1
        # (rows kept after the step, None: all): 9 rows -> 6 (one finished in every group) -> 4 (a whole prompt
        # finished: 2 prompts x 2) -> 3 (unequal groups: per-row caches from then on)
        for keep in (None, [0, 1, 3, 4, 6, 7], None, [0, 1, 4, 5], None, [0, 2, 3], None):
            token = torch.randint(0, len(tokenizer), (position.shape[0],), generator=gen)
            got = lean.step(token, position, shared, None if getattr(shared, "shared", False) else pad)
            want = lean.step(token, position, rows, pad)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            position = position + 1
            if keep is not None:
                keep = torch.tensor(keep)
                shared.batch_select_indices(keep)
                rows.batch_select_indices(keep)
                lean.fit(len(keep))
                position, pad = position[keep], pad[keep]
                if not shared.regular:
                    assert len(keep) == 3
                    calls = len(attends)
                    shared = shared.materialize()
                    for mine, theirs in zip(shared.layers, rows.layers, strict=True):
                        assert type(mine) is decode._PreallocatedLayer
                        assert mine._key_buffer.shape == theirs._key_buffer.shape  # the same room left
                        for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                            assert a.shape == b.shape
                            assert torch.equal(a[:, :, :width], b[:, :, :width])  # the prompts': copied
                            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # generated: rounded apart
                else:
                    assert shared.group == len(keep) // len(shared.prefix_keys[0])
        assert calls == 6 * 2 and len(attends) == calls  # 6 steps x 2 layers shared, none after materialize


def _watch_shared(monkeypatch, cache_class) -> tuple[list[int], list[int]]:
    """Record each shared cache `cache_class` made (its group) and materialized (its rows then)."""
    made, materialized = [], []
    real_init, real_materialize = cache_class.__init__, cache_class.materialize
    monkeypatch.setattr(cache_class, "__init__", lambda self, *a: made.append(a[1]) or real_init(self, *a))
    monkeypatch.setattr(cache_class, "materialize", lambda self: materialized.append(len(self.keys[0]))
                        or real_materialize(self))
    return made, materialized


@MKL
@pytest.mark.parametrize("samples", [None, [range(1, 4)] * 3])
def test_generation_reads_each_prompts_keys_once_and_samples_what_per_row_caches_sample(samples, monkeypatch):
    """`TorchEngine.generate` on the fused float32 step (cpu_linear auto on an Intel CPU) holds each prompt's keys
    and values once for its rows, through rows finishing at EOS (the batch compacts, then falls below the fused
    path's minimum): the same completions as with per-row caches, log-probs within float32 rounding. Also for a
    call that draws some samples of each group."""
    from grpokit.rollout import decode

    monkeypatch.setattr(cpu_linear, "AUTO_MIN_WEIGHT", 0)
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: "GenuineIntel")
    model, tokenizer = _model("qwen2")
    prompts = [tokenizer(t)["input_ids"] for t in PROMPTS]
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=5, stop_token_ids=list(range(20, 40)))
    made, materialized = _watch_shared(monkeypatch, decode.SharedPrefixCache)
    shared = TorchEngine(model, 0, cpu_linear="auto").generate(prompts, 4, params, samples=samples)
    assert made == [4 if samples is None else 3] and materialized, (made, materialized)
    lengths = [len(c) for c in shared.completion_ids]
    assert min(lengths) < max(lengths), lengths  # rows finished apart: the batch compacted
    with mock.patch.object(decode.SharedPrefixCache, "applies", lambda cache: False):
        rows = TorchEngine(model, 0, cpu_linear="auto").generate(prompts, 4, params, samples=samples)
    assert len(made) == 1
    assert shared.completion_ids == rows.completion_ids and shared.finish_reasons == rows.finish_reasons
    for a, b in zip(shared.sampler_logps, rows.sampler_logps, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)


def test_rotation_with_a_signed_sine_is_the_fast_rotation_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    angles = torch.rand(5, 1, 32, generator=gen) * 100
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()  # [N, 1, D]
    signed = torch.cat((-sin[..., :32], sin[..., 32:]), dim=-1)
    for scale in (1e-3, 1.0, 50.0):
        x = torch.randn(5, 12, 64, generator=gen) * scale
        got = decoder._rotate_signed(x, cos, signed)
        assert torch.equal(got, decoder._rotate_fast(x, cos, sin))
        want = decoder._rotate(x.double(), cos.double(), sin.double())
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6 * scale)
        strided = torch.randn(5, 20, 64, generator=gen)[:, 4:16] * scale  # a view, as the step's query/key slice
        assert torch.equal(decoder._rotate_signed(strided, cos, signed), decoder._rotate_fast(strided, cos, sin))


@pytest.mark.parametrize("width", [96, 576, 1536])  # 576: SmolLM2's (the tiny models' 32 divides exactly anyway)
def test_the_fused_steps_rms_norm_is_the_models(width):
    """The fused step's `_rms_norm_fast`, and the other steps' `_rms_norm_on`, on a norm's constants cast once, equal
    transformers' computation bit for bit at real models' widths, and float64 within float32 rounding."""
    gen = torch.Generator().manual_seed(0)
    norm = torch.nn.Module()
    norm.weight, norm.variance_epsilon = torch.randn(width, generator=gen), 1e-6
    for scale in (1e-3, 1.0, 50.0):
        x = torch.randn(7, width, generator=gen) * scale
        constants = decoder._norm_constants(norm, width)
        fast = decoder._rms_norm_fast(x, *constants)
        assert torch.equal(fast, decoder._rms_norm(x, norm))
        assert torch.equal(decoder._rms_norm_on(x, constants), decoder._rms_norm(x, norm))
        assert all(c.dtype == torch.float32 and c.dim() == 0 for c in constants[1:])
        want = norm.weight.double() * x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
        torch.testing.assert_close(fast.double(), want, rtol=1e-5, atol=1e-6)


@MKL
def test_fused_mkl_products_repack_as_the_batch_halves_and_drop_below_the_minimum(monkeypatch):
    monkeypatch.setattr(cpu_linear, "AUTO_MIN_WEIGHT", 0)
    model, _ = _model("llama")
    packs = []
    real = cpu_linear._mkl_pack
    monkeypatch.setattr(cpu_linear, "_mkl_pack", lambda w, rows: packs.append(rows) or real(w, rows))
    lean = decoder.LeanDecoder(model, bf16=False, mkl_rows=24)
    assert packs == [24] * 9
    for rows, packed_for, total in [(20, 24, 9), (13, 24, 9), (12, 12, 18), (7, 12, 18), (6, 6, 27), (4, 6, 27),
                                    (3, None, 27)]:
        lean.fit(rows)
        assert len(packs) == total and lean.mkl_rows == (packed_for or 0), rows
        assert (lean.mkl is None) is (packed_for is None), rows
    lean = decoder.LeanDecoder(model, bf16=False, mkl_rows=8)
    lean.fit(4)
    assert lean.mkl_rows == 4 and packs[-9:] == [4] * 9  # halved to MKL_MIN_ROWS: packed for it
    lean = decoder.LeanDecoder(model, bf16=False, mkl_rows=5)
    lean.fit(4)
    assert lean.mkl_rows == 5
    lean.fit(3)  # not halved, but below MKL_MIN_ROWS
    assert lean.mkl is None
    with pytest.raises(RuntimeError, match="LeanDecoder.fit"):
        fresh = decoder.LeanDecoder(model, bf16=False, mkl_rows=24)
        fresh._mkl_mm(torch.zeros(12, 32), fresh.mkl[0])  # half the rows it was packed for: fit() was skipped


def test_fused_mkl_products_need_every_layer_at_the_size_threshold(monkeypatch):
    """Only where cpu_linear would pack every layer (all at least AUTO_MIN_WEIGHT weights, plain nn.Linear) does
    the decoder fuse; otherwise it steps on the model's layers (which the sampler then packs one by one)."""
    model, _ = _model("llama")
    monkeypatch.setattr(cpu_linear, "mkl_shape_stand_in_works", lambda: True)
    assert decoder.LeanDecoder(model, bf16=False, mkl_rows=8).mkl is None  # hidden 32: layers of 2,048 weights
    monkeypatch.setattr(cpu_linear, "AUTO_MIN_WEIGHT", 0)
    assert decoder.LeanDecoder(model, bf16=False).mkl is None  # no mkl_rows: not asked to pack
    cpu_linear.use_onednn(model)
    assert decoder.LeanDecoder(model, bf16=False, mkl_rows=8).mkl is None  # layers on oneDNN: not MKL's
    cpu_linear.restore(model)
    monkeypatch.setattr(cpu_linear, "mkl_shape_stand_in_works", lambda: False)  # a torch whose op reads the weight
    assert decoder.LeanDecoder(model, bf16=False, mkl_rows=8).mkl is None


@MKL
def test_mkl_packed_op_takes_a_stand_in_for_the_plain_weight():
    """The fused copies rely on it (no concatenated float32 weights held); a torch that reads the plain weight on
    the packed path turns the fused path off instead of computing on zeros."""
    assert cpu_linear.mkl_shape_stand_in_works()


def test_some_samples_of_a_group_are_those_of_the_full_call_on_the_lean_path():
    model, tokenizer = _model("llama")
    prompts = [tokenizer(t)["input_ids"] for t in PROMPTS]
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=4)
    engine = TorchEngine(model, 0)
    full = engine.generate(prompts, 4, params)
    part = engine.generate(prompts, 4, params, samples=[range(1, 3)] * 3)
    assert part.completion_ids == [full.completion_ids[i * 4 + j] for i in range(3) for j in (1, 2)]


def _worst_bf16_logp_gap(model, rows, rollout, temperature: float) -> float:
    """The largest gap between the sampler's log-probs and the trainer's recompute of its completions under bf16
    autocast (rows: each completion's prompt ids)."""
    input_ids, attention, cmask = pack(rows, rollout.completion_ids, 0, "cpu")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logps, _ = completion_logps(model, input_ids, attention, cmask.shape[1], temperature=temperature,
                                    chunk_size=7)
    return max((logps[i, :len(s)].float() - torch.tensor(s)).abs().max().item()
               for i, s in enumerate(rollout.sampler_logps))


@BF16
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_bf16_generation_logps_match_the_trainers_autocast_recompute(kind):
    """Under bf16 autocast the sampler runs its bf16 path (fused products on weights packed once, its own bf16 KV
    cache growing past its first chunk); the trainer recomputes the same ids under autocast: per-token log-probs
    agree within 0.02 nats (bf16 keeps 8 bits of mantissa: logits of magnitude ~1-10 round by ~0.004-0.03, and the
    two paths round different products and sums). The model is left as it was."""
    model, tokenizer = _model(kind, tied=kind == "llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    prefills = []
    real = decoder.LeanDecoder.prefill
    params = SamplingParams(max_tokens=decoder.BF16Cache.CHUNK + 12, temperature=0.7, seed=3)
    with (torch.autocast("cpu", dtype=torch.bfloat16),
          mock.patch.object(decoder.LeanDecoder, "prefill", lambda self, *a: prefills.append(1) or real(self, *a))):
        prompts = [tokenizer(t)["input_ids"] for t in PROMPTS]
        rollout = TorchEngine(model, 0).generate(prompts, 4, params)
    assert prefills and all(len(c) == params.max_tokens for c in rollout.completion_ids)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert _worst_bf16_logp_gap(model, [p for p in prompts for _ in range(4)], rollout, 0.7) < 0.02


def test_bf16_cache_attention_matches_float64_over_padding_and_unfilled_positions():
    """BF16Cache.attend reads whole buffers: padded prompt positions and positions not yet filled must weigh 0."""
    torch.manual_seed(0)
    batch, kv_heads, groups, dim, length = 3, 2, 3, 8, 5
    padding = torch.tensor([[False] * 5, [True, True, False, False, False], [True] * 4 + [False]])
    cache = decoder.BF16Cache(1, batch, kv_heads, dim, length, padding, torch.device("cpu"))
    keys = torch.randn(batch, kv_heads, length + 40, dim)
    values = torch.randn(batch, kv_heads, length + 40, dim)
    cache.keys[0][:, :, :length] = keys[:, :, :length]
    cache.values[0][:, :, :length] = values[:, :, :length]
    for step in range(40):  # past the first chunk: the buffers grow
        pos = cache.advance()
        assert pos == length + step
        cache.keys[0][:, :, pos] = keys[:, :, pos]
        cache.values[0][:, :, pos] = values[:, :, pos]
        query = torch.randn(batch, kv_heads * groups, dim)
        got = cache.attend(0, query.to(torch.bfloat16)).float()
        k = keys[:, :, :pos + 1].to(torch.bfloat16).double()
        v = values[:, :, :pos + 1].to(torch.bfloat16).double()
        q = query.to(torch.bfloat16).double().view(batch, kv_heads, groups, dim)
        scores = q @ k.transpose(-1, -2)  # [B, Hkv, g, L]
        scores[:, :, :, :length] = scores[:, :, :, :length].masked_fill(padding[:, None, None], float("-inf"))
        expected = (scores.softmax(-1) @ v).reshape(batch, -1)
        torch.testing.assert_close(got.double(), expected, atol=0.03, rtol=0.02)
    assert cache.keys[0].shape[2] > length + decoder.BF16Cache.CHUNK


def _bf16_reference(query, keys, values, masked):
    """float64 single-token attention over bf16-rounded operands: query [N, H, D], keys/values [N, Hkv, L, D],
    masked [N, L] (True: weighs 0) -> [N, H * D]."""
    rows, heads, dim = query.shape
    kv_heads = keys.shape[1]
    q = query.double().view(rows, kv_heads, heads // kv_heads, dim)
    scores = (q @ keys.double().transpose(-1, -2)).masked_fill(masked[:, None, None], float("-inf"))
    return (scores.softmax(-1) @ values.double()).reshape(rows, -1)


def test_shared_bf16_cache_attends_as_the_per_row_cache_then_becomes_it():
    """`SharedBF16Cache` (each prompt's bf16 keys and values once for its rows) against float64 attention over the
    per-row `BF16Cache`'s operands, over left padding, its generated buffers growing past a chunk, rows finishing
    in every group, a whole prompt finishing; then, with groups of unequal size, `materialize()` gives the per-row
    cache the same generation would hold: the same buffers, mask and length."""
    from grpokit.rollout import decode

    torch.manual_seed(0)
    prompts, kv_heads, per_kv, dim, width, group = 3, 2, 3, 8, 5, 3
    padding = torch.tensor([[False] * 5, [True, True, False, False, False], [True] * 4 + [False]])
    caches = []
    for _ in range(2):
        cache = decoder.BF16Cache(2, prompts, kv_heads, dim, width, padding, torch.device("cpu"))
        caches.append(cache)
    prompt_keys = [torch.randn(prompts, kv_heads, width, dim).to(torch.bfloat16) for _ in range(2)]
    prompt_values = [torch.randn(prompts, kv_heads, width, dim).to(torch.bfloat16) for _ in range(2)]
    for cache in caches:
        for i in range(2):
            cache.keys[i][:, :, :width] = prompt_keys[i]
            cache.values[i][:, :, :width] = prompt_values[i]
    shared = decode.SharedBF16Cache(caches[0], group)
    rows = caches[1]
    rows.batch_repeat_interleave(group)
    assert shared.padding is not None and len(shared.keys[0]) == prompts * group
    # the rows kept after each step (None: all): 9 -> 6 (one finished in every group) -> 4 (a whole prompt) -> 3
    plan = [None] * 34 + [[0, 1, 3, 4, 6, 7], None, [0, 1, 4, 5], None, [0, 2, 3]]
    steps = 0
    for keep in plan:
        position, at = shared.advance(), rows.advance()
        assert at == width + position
        n = len(shared.keys[0])
        for i in range(2):
            key = torch.randn(n, kv_heads, dim).to(torch.bfloat16)
            value = torch.randn(n, kv_heads, dim).to(torch.bfloat16)
            shared.keys[i][:, :, position], shared.values[i][:, :, position] = key, value
            rows.keys[i][:, :, at], rows.values[i][:, :, at] = key, value
            query = torch.randn(n, kv_heads * per_kv, dim).to(torch.bfloat16)
            got = shared.attend(i, query).double()
            want = _bf16_reference(query, rows.keys[i][:, :, :at + 1], rows.values[i][:, :, :at + 1],
                                   rows.masked[:, 0, 0, :at + 1])
            torch.testing.assert_close(got, want, atol=0.03, rtol=0.02)
            torch.testing.assert_close(got, rows.attend(i, query).double(), atol=0.03, rtol=0.02)
        steps += 1
        if keep is not None:
            keep = torch.tensor(keep)
            shared.batch_select_indices(keep)
            rows.batch_select_indices(keep)
            if not shared.regular:
                shared = shared.materialize()
                break
            assert shared.group == len(keep) // len(shared.prefix_keys[0])
    assert steps == len(plan) and type(shared) is decoder.BF16Cache and shared.keys[0].shape[2] > width + 32
    assert shared.length == rows.length and torch.equal(shared.masked, rows.masked)
    for i in range(2):
        assert torch.equal(shared.keys[i], rows.keys[i]) and torch.equal(shared.values[i], rows.values[i])


@BF16
@pytest.mark.parametrize("samples", [None, [range(1, 4)] * 3])
def test_bf16_generation_reads_each_prompts_keys_once_through_rows_finishing(samples, monkeypatch):
    """Under bf16 autocast `TorchEngine.generate` holds each prompt's keys and values once for its rows
    (`SharedBF16Cache`), through rows finishing apart at EOS (the batch compacts, groups become unequal and the
    cache per-row): the trainer's autocast recompute of its completions gives their log-probs within 0.02 nats, as
    for per-row caches (test above). Also for a call that draws some samples of each group."""
    from grpokit.rollout import decode

    model, tokenizer = _model("qwen2")
    prompts = [tokenizer(t)["input_ids"] for t in PROMPTS]
    params = SamplingParams(max_tokens=decoder.BF16Cache.CHUNK + 8, temperature=1.0, seed=5,
                            stop_token_ids=[20, 21])
    made, materialized = _watch_shared(monkeypatch, decode.SharedBF16Cache)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rollout = TorchEngine(model, 0).generate(prompts, 4, params, samples=samples)
    assert made == [4 if samples is None else 3] and materialized, (made, materialized)
    lengths = [len(c) for c in rollout.completion_ids]
    assert min(lengths) < max(lengths) and max(lengths) > decoder.BF16Cache.CHUNK, lengths
    per_prompt = 4 if samples is None else 3
    assert _worst_bf16_logp_gap(model, [p for p in prompts for _ in range(per_prompt)], rollout, 1.0) < 0.02


def _lora(kind: str):
    """A tiny model with plain LoRA adapters on every linear layer, lora_B random (not peft's zeros), so that the
    adapters change the logits."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = _model(kind, tied=kind == "qwen3")
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.2)
    return lora.eval(), tokenizer


@pytest.mark.parametrize("path", ["layers", pytest.param("fused", marks=MKL)])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_lora_models_decode_on_the_lean_path_with_their_adapters(kind, path, monkeypatch):
    """A peft model with plain LoRA adapters decodes on the lean path: on its LoRA layers ("layers": the float32
    step, bit for bit the model's own forward), or fused on MKL's packed products of each weight with its adapters
    merged in ("fused": rounded differently, log-probs within 1e-5). With the adapters disabled, the base model's
    generation; the adapters change it."""
    if path == "fused":
        monkeypatch.setattr(cpu_linear, "AUTO_MIN_WEIGHT", 0)
        monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: "GenuineIntel")
    else:
        monkeypatch.setattr(cpu_linear, "mkl_rows", lambda *a: None)
    lora, tokenizer = _lora(kind)
    assert decoder.unsupported(lora) is None and torch_engine.lean_mode(lora) == "float32"
    params = SamplingParams(max_tokens=12, temperature=0.9, seed=7, stop_token_ids=[tokenizer.eos_token_id])
    fused, steps = [], []
    real_step = decoder.LeanDecoder.step
    monkeypatch.setattr(decoder.LeanDecoder, "step",
                        lambda self, *a: steps.append(1) or fused.append(self.mkl is not None) or real_step(self, *a))
    _, lean, plain = _rollouts(lora, tokenizer, params)
    assert steps and all(fused) == (path == "fused") and any(fused) == (path == "fused")
    assert lean.completion_ids == plain.completion_ids and lean.finish_reasons == plain.finish_reasons
    if path == "layers":
        assert lean.sampler_logps == plain.sampler_logps
    for a, b in zip(lean.sampler_logps, plain.sampler_logps, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)
    with lora.disable_adapter():
        _, base_lean, base_plain = _rollouts(lora, tokenizer, params)
    assert base_lean.completion_ids == base_plain.completion_ids
    for a, b in zip(base_lean.sampler_logps, base_plain.sampler_logps, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)
    assert base_lean.sampler_logps != lean.sampler_logps


@BF16
def test_bf16_lora_generation_logps_match_the_trainers_autocast_recompute():
    """Under bf16 autocast a LoRA model decodes on the bf16 path with its adapters merged into the bf16 weights:
    the trainer's autocast recompute (adapters as peft runs them) gives its log-probs within 0.02 nats."""
    lora, tokenizer = _lora("qwen2")
    steps = []
    real_step = decoder.LeanDecoder.step
    prompts = [tokenizer(t)["input_ids"] for t in PROMPTS]
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=3)
    with (torch.autocast("cpu", dtype=torch.bfloat16),
          mock.patch.object(decoder.LeanDecoder, "step", lambda self, *a: steps.append(self.bf16) or
                            real_step(self, *a))):
        rollout = TorchEngine(lora, 0).generate(prompts, 2, params)
    assert steps and all(steps)
    assert _worst_bf16_logp_gap(lora, [p for p in prompts for _ in range(2)], rollout, 1.0) < 0.02


def test_unsupported_models_say_why_and_generate_on_their_own_forward():
    from peft import LoraConfig, get_peft_model

    model, tokenizer = _model("llama")
    assert decoder.unsupported(model) is None
    lora = get_peft_model(_model("llama")[0], LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    assert "wrapped" in decoder.unsupported(lora.get_base_model()) and "DoRA" in decoder.unsupported(lora)
    assert torch_engine.lean_mode(lora) is None
    merged, _ = _lora("llama")
    merged.merge_adapter()  # the base weights hold the adapters already: not merged in again
    assert "merged" in decoder.unsupported(merged) and torch_engine.lean_mode(merged) is None
    from peft import PromptTuningConfig

    prompted = get_peft_model(_model("llama")[0], PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert "prompt-learning" in decoder.unsupported(prompted)  # its virtual tokens are the model's forward's
    hooked, _ = _model("llama")
    hooked.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert "hook" in decoder.unsupported(hooked)
    half, _ = _model("llama")
    half.to(torch.bfloat16)
    assert "float32" in decoder.unsupported(half)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    assert "gpt2" in decoder.unsupported(gpt2) and torch_engine.lean_mode(gpt2) is None
    windowed = MistralForCausalLM(MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                sliding_window=16))
    assert "sliding" in decoder.unsupported(windowed)
    steps = []
    real = decoder.LeanDecoder.step
    with mock.patch.object(decoder.LeanDecoder, "step", lambda self, *a: steps.append(1) or real(self, *a)):
        out = TorchEngine(lora, 0).generate([tokenizer("Hi")["input_ids"]], 2, SamplingParams(max_tokens=5, seed=1))
    assert not steps and all(len(c) == 5 for c in out.completion_ids)
