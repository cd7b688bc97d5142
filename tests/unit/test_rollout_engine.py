"""TorchEngine's sampling settings, stop conditions and batching, against float64 references and transformers."""

import math

import pytest
import torch

from grpokit.algo.batches import pack
from grpokit.models.logprobs import completion_logps
from grpokit.rollout.base import SamplingParams
from grpokit.rollout.torch_engine import (
    TorchEngine,
    apply_repetition_penalty,
    draw,
    filter_logits,
    row_uniforms,
    sample,
)


def _prompts(tokenizer):
    texts = ["What is 2 + 3?", "Hi", "A much longer prompt about 17 - 4 and more words."]
    return [tokenizer(t)["input_ids"] for t in texts]


def _kept(filtered: torch.Tensor) -> torch.Tensor:
    return filtered != float("-inf")


# --- the sampling helpers, against plain float64 references ---------------------------------

def test_min_p_keeps_tokens_with_p_at_least_min_p_times_p_max():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 1.9, -3.0, 0.0, 1.2]])
    min_p = 0.3
    probs = torch.softmax(logits.double(), dim=-1)[0]
    want = [bool(p >= min_p * probs.max()) for p in probs]
    assert want.count(True) not in (1, len(want))  # the row really is cut somewhere in the middle
    assert _kept(filter_logits(logits, min_p=min_p))[0].tolist() == want


@pytest.mark.parametrize("seed", range(5))
def test_min_p_random_rows(seed):
    gen = torch.Generator().manual_seed(seed)
    rows, vocab = 1 + seed, 50 + 37 * seed
    logits = torch.randn(rows, vocab, generator=gen) * 3
    min_p = 0.05 * (seed + 1)
    probs = torch.softmax(logits.double(), dim=-1)
    want = probs >= min_p * probs.max(dim=-1, keepdim=True).values
    assert torch.equal(_kept(filter_logits(logits, min_p=min_p)), want)


def _top_p_reference(row: torch.Tensor, top_p: float) -> list[bool]:
    """Smallest set of likeliest tokens whose probability reaches top_p (the top token always kept)."""
    probs = torch.softmax(row.double(), dim=-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep, mass = [False] * len(probs), 0.0
    for i in order:
        if mass >= top_p:
            break
        keep[i] = True
        mass += probs[i]
    return keep


@pytest.mark.parametrize("vocab,scale", [(40, 3.0), (3000, 0.05), (3000, 4.0)])
def test_top_p_matches_sorted_reference(vocab, scale):
    """scale 0.05 over 3000 tokens: the nucleus is larger than the 1024 candidates searched first."""
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(vocab)) * scale
    for top_p in (0.3, 0.9):
        kept = _kept(filter_logits(logits, top_p=top_p))
        for r in range(len(logits)):
            assert kept[r].tolist() == _top_p_reference(logits[r], top_p)
    if scale < 1:
        assert kept.sum(dim=-1).min() > 1024


def test_top_k_then_top_p_renormalises_over_top_k():
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0, -1.0, 2.7]])
    # over the top 3 tokens the first two carry ~0.69 of the mass; over all six they carry less than 0.6
    kept = _kept(filter_logits(logits, top_k=3, top_p=0.6))
    assert kept[0].tolist() == _top_p_reference(logits[0, :3], 0.6) + [False, False, False]
    assert kept[0].tolist() == [True, True, False, False, False, False]


def test_repetition_penalty_matches_reference():
    logits = torch.tensor([[2.0, -1.5, 0.0, 3.25, -0.25, 1.0], [-2.0, 0.5, 4.0, -3.0, 0.75, -0.5]])
    seen = torch.tensor([[True, True, True, False, True, False], [False, True, False, True, True, True]])
    penalty = 1.7
    want = logits.double().clone()
    for r in range(2):
        for v in range(6):
            if seen[r, v]:
                want[r, v] = want[r, v] / penalty if want[r, v] > 0 else want[r, v] * penalty
    got = apply_repetition_penalty(logits, seen, penalty)
    torch.testing.assert_close(got.double(), want, rtol=1e-7, atol=0)
    assert not torch.equal(got, logits)


def test_draw_inverts_the_cdf_and_never_draws_a_filtered_token():
    """Evenly spaced uniforms: each token is drawn in proportion to its probability, to within one draw."""
    logits = torch.tensor([[1.0, float("-inf"), 0.0, 2.0, float("-inf"), -1.0]])
    draws = 20_000
    uniforms = (torch.arange(draws, dtype=torch.float64) + 0.5) / draws
    tokens = draw(logits.expand(draws, -1), uniforms.float())
    counts = torch.bincount(tokens, minlength=6).double()
    probs = torch.softmax(logits.double(), dim=-1)[0]
    assert counts[1] == counts[4] == 0
    assert (counts - probs * draws).abs().max() <= 1.5
    # u just below 1 must still land on a real token, not past the end
    assert draw(logits, torch.tensor([1 - 2**-24])).item() == 5


def test_row_uniforms_depend_on_prompt_not_batch_position():
    a, b = [5, 6, 7], [8, 9]
    alone = row_uniforms([a], 2, 6, seed=3)
    batched = row_uniforms([b, a], 2, 6, seed=3)
    assert torch.equal(batched[2:], alone)
    assert not torch.equal(batched[:2], alone)
    repeated = row_uniforms([a, a], 1, 6, seed=3)  # the same prompt twice still gets two streams
    assert not torch.equal(repeated[0], repeated[1])
    assert not torch.equal(row_uniforms([a], 2, 6, seed=4), alone)


# --- the engine on the tiny model ---------------------------------------------------------------

def test_greedy_with_repetition_penalty_matches_transformers(tiny_model):
    model, tokenizer = tiny_model
    engine = TorchEngine(model, 0)
    prompts = _prompts(tokenizer)
    rollout = engine.generate(prompts, 1, SamplingParams(max_tokens=16, temperature=0.0, repetition_penalty=1.6))
    plain = engine.generate(prompts, 1, SamplingParams(max_tokens=16, temperature=0.0)).completion_ids
    assert rollout.completion_ids != plain  # the penalty changed something
    for ids, got in zip(prompts, rollout.completion_ids, strict=True):
        want = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, repetition_penalty=1.6,
                              eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert got == want


@pytest.mark.parametrize("settings", [
    dict(temperature=0.6),
    dict(temperature=1.0),
    dict(temperature=0.0),
    dict(temperature=1.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.3),
])
def test_sampler_logps_are_the_tempered_unfiltered_unpenalised_logps(tiny_model, settings):
    """Also each token's entropy (`SamplingParams.entropies`): the trainer's entropy of the same distribution."""
    model, tokenizer = tiny_model
    prompts = _prompts(tokenizer)
    engine = TorchEngine(model, 0)
    rollout = engine.generate(prompts, 3, SamplingParams(max_tokens=12, seed=11, stop_token_ids=[7], entropies=True,
                                                         **settings))
    input_ids, attention, cmask = pack([p for p in prompts for _ in range(3)], rollout.completion_ids, 0, "cpu")
    with torch.no_grad():
        logps, entropy = completion_logps(model, input_ids, attention, cmask.shape[1],
                                          temperature=settings["temperature"])
    assert len(rollout.sampler_entropies) == len(rollout.completion_ids)
    for i, (sampled, entropies) in enumerate(zip(rollout.sampler_logps, rollout.sampler_entropies, strict=True)):
        assert len(entropies) == len(sampled) == len(rollout.completion_ids[i])
        torch.testing.assert_close(logps[i, :len(sampled)], torch.tensor(sampled), rtol=0, atol=1e-5)
        torch.testing.assert_close(entropy[i, :len(sampled)], torch.tensor(entropies), rtol=0, atol=1e-5)
    unasked = engine.generate(prompts, 3, SamplingParams(max_tokens=12, seed=11, stop_token_ids=[7], **settings))
    assert unasked.sampler_entropies is None
    assert unasked.completion_ids == rollout.completion_ids and unasked.sampler_logps == rollout.sampler_logps


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.5), dict(top_k=3), dict(top_p=0.7),
                                      dict(repetition_penalty=1.5), dict(temperature=0.0)])
def test_sample_entropy_matches_a_float64_reference(settings):
    """The entropy `sample` writes: of softmax(logits / temperature), whatever the filters and penalty drew from;
    from the drawing weights when nothing filters (the fast path), from the logits otherwise."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3000, generator=gen) * 1.5
    params = SamplingParams(max_tokens=1, **settings)
    temperature = params.temperature or 1.0
    seen = (torch.rand(5, 3000, generator=gen) < 0.1) if params.repetition_penalty != 1.0 else None
    uniform = None if params.temperature == 0 else torch.rand(5, generator=gen)
    entropy = torch.full((5,), float("nan"))
    token, logp = sample(logits, params, uniform, seen, None, entropy)
    log_p = torch.log_softmax(logits.double() / temperature, dim=-1)
    want = -(log_p.exp() * log_p).sum(-1)
    assert want.min() > 1.0  # not a near-degenerate distribution, where any formula would agree
    torch.testing.assert_close(entropy.double(), want, rtol=0, atol=2e-5)
    same_token, same_logp = sample(logits, params, uniform, seen)  # the draw does not depend on asking
    assert torch.equal(token, same_token) and torch.equal(logp, same_logp)


def test_stop_strings_end_completions(tiny_model):
    model, tokenizer = tiny_model
    engine = TorchEngine(model, 0, tokenizer=tokenizer)
    stops = ["a", "7"]
    rollout = engine.generate(_prompts(tokenizer), 6, SamplingParams(max_tokens=40, seed=2, stop=stops))
    reasons = rollout.finish_reasons
    assert "stop" in reasons
    for ids, reason in zip(rollout.completion_ids, reasons, strict=True):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        before = tokenizer.decode(ids[:-1], skip_special_tokens=True)
        if reason == "stop":  # ends at (and keeps) the token that completed a stop string
            assert any(s in text for s in stops) and not any(s in before for s in stops)
        else:
            assert len(ids) == 40 and not any(s in text for s in stops)


def test_multi_character_stop_string(tiny_model):
    """A stop string spanning several tokens ends the row at its last token."""
    model, tokenizer = tiny_model
    engine = TorchEngine(model, 0, tokenizer=tokenizer)
    params = SamplingParams(max_tokens=30, seed=4)
    free = engine.generate(_prompts(tokenizer)[:1], 1, params).completion_ids[0]
    text = tokenizer.decode(free, skip_special_tokens=True)
    start = next(k for k in range(3, len(text) - 3) if text.find(text[k:k + 3]) == k)  # first occurrence at k
    stop = text[start:start + 3]
    params.stop = [stop]
    got = engine.generate(_prompts(tokenizer)[:1], 1, params)
    assert got.finish_reasons == ["stop"]
    assert tokenizer.decode(got.completion_ids[0], skip_special_tokens=True) == text[:start + 3]


def test_stop_string_without_tokenizer_is_an_error(tiny_model):
    model, tokenizer = tiny_model
    with pytest.raises(ValueError, match="tokenizer"):
        TorchEngine(model, 0).generate(_prompts(tokenizer), 2, SamplingParams(max_tokens=4, stop=["."]))


def test_max_tokens_gives_length(tiny_model):
    model, tokenizer = tiny_model
    rollout = TorchEngine(model, 0).generate(_prompts(tokenizer), 2, SamplingParams(max_tokens=9, seed=0))
    assert rollout.finish_reasons == ["length"] * 6
    assert [len(c) for c in rollout.completion_ids] == [9] * 6
    assert [len(lp) for lp in rollout.sampler_logps] == [9] * 6


def test_prompts_of_different_lengths_sample_as_if_alone(tiny_model):
    """Left padding and the other prompts of the batch change neither the tokens nor their log-probs."""
    model, tokenizer = tiny_model
    model = model.double()
    prompts = _prompts(tokenizer)
    assert len({len(p) for p in prompts}) == 3
    engine = TorchEngine(model, 0)
    params = SamplingParams(max_tokens=10, temperature=0.9, seed=5, stop_token_ids=[12, 30])
    batched = engine.generate(prompts, 2, params)
    for i, prompt in enumerate(prompts):
        alone = engine.generate([prompt], 2, params)
        assert batched.completion_ids[2 * i:2 * i + 2] == alone.completion_ids
        for got, want in zip(batched.sampler_logps[2 * i:2 * i + 2], alone.sampler_logps, strict=True):
            assert all(math.isclose(g, w, abs_tol=1e-5) for g, w in zip(got, want, strict=True))


def test_n_one_and_n_many(tiny_model):
    model, tokenizer = tiny_model
    engine = TorchEngine(model, 0)
    prompts = _prompts(tokenizer)
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    one = engine.generate(prompts, 1, greedy)
    four = engine.generate(prompts, 4, greedy)
    assert one.group_size == 1 and four.group_size == 4
    assert four.completion_ids == [c for c in one.completion_ids for _ in range(4)]  # prompt-major order
    sampled = engine.generate(prompts, 4, SamplingParams(max_tokens=6, seed=1))
    assert len(sampled.completion_ids) == len(sampled.finish_reasons) == 12
    assert len({tuple(c) for c in sampled.completion_ids[:4]}) > 1  # a group's samples differ


def test_some_samples_of_each_group_are_those_rows_of_the_full_call(tiny_model):
    """`samples` (a group split across processes) draws exactly the rows a full call gives those sample indices."""
    model, tokenizer = tiny_model
    engine = TorchEngine(model.double(), 0)
    prompts = _prompts(tokenizer)
    params = SamplingParams(max_tokens=10, temperature=0.9, seed=5, stop_token_ids=[12, 30], repetition_penalty=1.2)
    full = engine.generate(prompts, 4, params)
    part = engine.generate(prompts, 4, params, samples=[range(2, 4), range(0, 4), range(0, 1)])
    rows = [2, 3, 4, 5, 6, 7, 8]
    assert part.completion_ids == [full.completion_ids[r] for r in rows]
    assert part.finish_reasons == [full.finish_reasons[r] for r in rows]
    for got, want in zip(part.sampler_logps, [full.sampler_logps[r] for r in rows], strict=True):
        assert got == pytest.approx(want, abs=1e-9)
    with pytest.raises(ValueError, match="one range within"):
        engine.generate(prompts, 4, params, samples=[range(0, 5), range(0, 1), range(0, 1)])

