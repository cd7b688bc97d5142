"""The sampler's lean forward (grpokit.models.decoder): float32 bit for bit as the model's own forward, bf16 within
rounding of the trainer's autocast recompute, and the models it must leave to transformers."""

from __future__ import annotations

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


def test_some_samples_of_a_group_are_those_of_the_full_call_on_the_lean_path():
    model, tokenizer = _model("llama")
    prompts = [tokenizer(t)["input_ids"] for t in PROMPTS]
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=4)
    engine = TorchEngine(model, 0)
    full = engine.generate(prompts, 4, params)
    part = engine.generate(prompts, 4, params, samples=[range(1, 3)] * 3)
    assert part.completion_ids == [full.completion_ids[i * 4 + j] for i in range(3) for j in (1, 2)]


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
    rows = [p for p in prompts for _ in range(4)]
    input_ids, attention, cmask = pack(rows, rollout.completion_ids, 0, "cpu")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logps, _ = completion_logps(model, input_ids, attention, cmask.shape[1], temperature=0.7, chunk_size=7)
    worst = max((logps[i, :len(s)].float() - torch.tensor(s)).abs().max().item()
                for i, s in enumerate(rollout.sampler_logps))
    assert worst < 0.02, worst


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


def test_unsupported_models_say_why_and_generate_on_their_own_forward():
    from peft import LoraConfig, get_peft_model

    model, tokenizer = _model("llama")
    assert decoder.unsupported(model) is None
    lora = get_peft_model(_model("llama")[0], LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert "wrapped" in decoder.unsupported(lora.get_base_model())
    assert torch_engine.lean_mode(lora) is None
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
