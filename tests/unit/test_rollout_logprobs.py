"""The sampler and the log-prob path: each checked against plain transformers on a tiny model."""

import pytest
import torch

from grpokit.algo.batches import pack
from grpokit.models.logprobs import _HeadLogProbs, completion_logps, positions_from_mask
from grpokit.rollout.base import SamplingParams
from grpokit.rollout.torch_engine import TorchEngine


def _prompts(tokenizer):
    texts = ["What is 2 + 3?", "Hi", "A much longer prompt about 17 - 4 and more words."]
    return [tokenizer(t)["input_ids"] for t in texts]


def test_greedy_matches_transformers_generate(tiny_model):
    model, tokenizer = tiny_model
    prompts = _prompts(tokenizer)
    eos = tokenizer.eos_token_id
    engine = TorchEngine(model, 0)
    rollout = engine.generate(prompts, 1, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[eos]))
    for ids, got, reason in zip(prompts, rollout.completion_ids, rollout.finish_reasons, strict=True):
        # one prompt at a time: no padding involved in the reference
        want = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=eos,
                              pad_token_id=0)[0, len(ids):].tolist()
        assert got == want
        assert reason == ("stop" if got[-1] == eos else "length")


def test_sampler_logps_equal_trainer_logps(tiny_model):
    """The ids the engine generated are the ids the trainer scores, with the same log-probs."""
    model, tokenizer = tiny_model
    prompts = _prompts(tokenizer)
    engine = TorchEngine(model, 0)
    params = SamplingParams(max_tokens=10, temperature=0.7, seed=3, stop_token_ids=[5, 9])
    rollout = engine.generate(prompts, 4, params)
    prompt_rows = [p for p in prompts for _ in range(4)]
    input_ids, attention, cmask = pack(prompt_rows, rollout.completion_ids, 0, "cpu")
    with torch.no_grad():
        logps, entropy = completion_logps(model, input_ids, attention, cmask.shape[1], temperature=0.7, chunk_size=7)
    for i, sampled in enumerate(rollout.sampler_logps):
        n = len(sampled)
        torch.testing.assert_close(logps[i, :n], torch.tensor(sampled), rtol=1e-4, atol=1e-5)
        assert cmask[i].sum() == n
    assert (entropy >= 0).all()


def test_stop_tokens_end_rows_and_set_finish_reason(tiny_model):
    model, tokenizer = tiny_model
    engine = TorchEngine(model, 0)
    rollout = engine.generate(_prompts(tokenizer), 8, SamplingParams(max_tokens=30, temperature=1.0, seed=0,
                                                                      stop_token_ids=list(range(10, 60))))
    assert len(rollout.completion_ids) == 24
    for ids, reason in zip(rollout.completion_ids, rollout.finish_reasons, strict=True):
        stopped_on = [i for i, tok in enumerate(ids) if 10 <= tok < 60]
        if reason == "stop":
            assert stopped_on == [len(ids) - 1]  # the stop token is last and appears once
        else:
            assert not stopped_on and len(ids) == 30
    assert "stop" in rollout.finish_reasons


def test_same_seed_same_samples_other_seed_differs(tiny_model):
    model, tokenizer = tiny_model
    engine = TorchEngine(model, 0)
    prompts = _prompts(tokenizer)
    a = engine.generate(prompts, 4, SamplingParams(max_tokens=8, temperature=1.0, seed=7)).completion_ids
    b = engine.generate(prompts, 4, SamplingParams(max_tokens=8, temperature=1.0, seed=7)).completion_ids
    c = engine.generate(prompts, 4, SamplingParams(max_tokens=8, temperature=1.0, seed=8)).completion_ids
    assert a == b and a != c


def test_top_k_one_is_greedy(tiny_model):
    model, tokenizer = tiny_model
    engine = TorchEngine(model, 0)
    prompts = _prompts(tokenizer)
    greedy = engine.generate(prompts, 1, SamplingParams(max_tokens=8, temperature=0.0)).completion_ids
    top1 = engine.generate(prompts, 1, SamplingParams(max_tokens=8, temperature=1.3, top_k=1, seed=1)).completion_ids
    tiny_p = engine.generate(prompts, 1,
                             SamplingParams(max_tokens=8, temperature=1.3, top_p=1e-6, seed=1)).completion_ids
    assert greedy == top1 == tiny_p


@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_chunked_logps_and_gradients_match_full_logits(tiny_model, chunk_size):
    model, tokenizer = tiny_model
    model = model.double()
    prompts = _prompts(tokenizer)
    completions = [[7, 8, 9], [10], [11, 12, 13, 14, 15]]
    input_ids, attention, cmask = pack(prompts, completions, 0, "cpu")
    t = cmask.shape[1]

    model.zero_grad()
    logps, _ = completion_logps(model, input_ids, attention, t, temperature=0.9, chunk_size=chunk_size)
    (logps * cmask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions_from_mask(attention)).logits
    full = torch.log_softmax(logits[:, -t - 1:-1] / 0.9, dim=-1).gather(-1, input_ids[:, -t:, None]).squeeze(-1)
    (full * cmask).sum().backward()
    torch.testing.assert_close(logps * cmask, full * cmask, rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-8, atol=1e-12, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_rows_sharing_a_prompt_share_its_forward_with_the_same_logps_and_gradients(tiny_model, checkpointing):
    """Groups of completions of one prompt (in any row order, one group split) equal whole-row forwards (float64)."""
    model, tokenizer = tiny_model
    model = model.double()
    model.train()
    if checkpointing:  # transformers drops the cache in checkpointed layers: the rows must run whole, still exact
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    prompts = _prompts(tokenizer)
    order = [0, 0, 1, 2, 1, 0, 2, 2, 1]  # three prompts, three completions each, interleaved
    completions = [[7 + i] * (1 + (i * 5) % 6) for i in range(len(order))]
    input_ids, attention, cmask = pack([prompts[k] for k in order], completions, 0, "cpu")
    t = cmask.shape[1]
    weights = torch.linspace(-1.0, 2.0, len(order), dtype=torch.float64)[:, None]

    batch_sizes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: batch_sizes.append(out.shape[0]))
    model.zero_grad()
    logps, _ = completion_logps(model, input_ids, attention, t, temperature=0.7, chunk_size=5)
    (logps * cmask * weights).sum().backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert batch_sizes == ([len(order)] if checkpointing else [3, len(order)])  # 3 distinct prompts run once each

    model.zero_grad()
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions_from_mask(attention)).logits
    full = torch.log_softmax(logits[:, -t - 1:-1] / 0.7, dim=-1).gather(-1, input_ids[:, -t:, None]).squeeze(-1)
    (full * cmask * weights).sum().backward()
    torch.testing.assert_close(logps * cmask, full * cmask, rtol=1e-10, atol=1e-12)
    # Llama's RMSNorm computes in float32 even in a float64 model, so summing the G rows' prompt gradients before
    # rather than after it shows at ~1e-7; a prompt cache cut off from autograd would differ by ~0.4
    tolerance = 1e-8 if checkpointing else 1e-6
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=tolerance, atol=tolerance * p.grad.abs().max(), msg=name)


def test_length_buckets_are_the_cheapest_grouping():
    """Against every partition of the rows (brute force): the fewest padded positions plus the per-group charge."""
    import itertools
    import random

    from grpokit.models.logprobs import length_buckets

    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for part in partitions(rest):
            for i in range(len(part)):
                yield part[:i] + [[first] + part[i]] + part[i + 1:]
            yield [[first]] + part

    def cost(groups, lengths, charge):
        return sum(len(g) * max(max(lengths[r] for r in g), 1) for g in groups) + charge * (len(groups) - 1)

    rng = random.Random(0)
    for trial in range(60):
        lengths = [rng.choice([0, 1, 3, 20, 64, 100, 128, 300]) for _ in range(rng.randint(1, 7))]
        charge = rng.choice([0, 16, 64, 1000])
        got = length_buckets(lengths, charge)
        assert sorted(itertools.chain(*got)) == list(range(len(lengths)))
        every = partitions(list(range(len(lengths))))
        assert cost(got, lengths, charge) == min(cost(p, lengths, charge) for p in every)
    assert length_buckets([5, 6, 7, 8]) == [[0, 1, 2, 3]]  # nothing worth a second call
    assert length_buckets([128, 10, 12, 130, 11, 9]) == [[5, 1, 4, 2], [0, 3]]


@pytest.mark.parametrize("share,checkpointing", [(True, False), (False, False), (True, True)])
def test_rows_of_very_different_lengths_run_in_groups_with_the_same_logps_and_gradients(tiny_model, share,
                                                                                       checkpointing):
    """Completions of 3 to 150 tokens: the decoder runs groups of similar length (fewer padded positions), the head
    sees only real tokens, and log-probs, entropies and gradients are those of whole rows through the model (float64);
    padded positions hold 0."""
    from grpokit.models import logprobs

    model, tokenizer = tiny_model
    model = model.double()
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    prompts = _prompts(tokenizer)
    lengths = [150, 3, 140, 5, 70, 8, 66, 145]
    order = [0, 0, 1, 0, 1, 0, 1, 2]
    completions = [[7 + (i * 13 + j * 7) % 50 for j in range(n)] for i, n in enumerate(lengths)]
    input_ids, attention, cmask = pack([prompts[k] for k in order], completions, 0, "cpu")
    t = cmask.shape[1]
    weights = torch.linspace(-1.0, 2.0, len(order), dtype=torch.float64)[:, None]

    batch_sizes, head_rows = [], []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: batch_sizes.append(out.shape[0]))
    real_apply = logprobs._HeadLogProbs.apply
    logprobs._HeadLogProbs.apply = lambda h, *rest: head_rows.append(h.shape[0]) or real_apply(h, *rest)
    try:
        model.zero_grad()
        logps, entropy = completion_logps(model, input_ids, attention, t, temperature=0.7, chunk_size=4096,
                                          share_prompts=share)
        (logps * cmask * weights).sum().backward()
    finally:
        hook.remove()
        logprobs._HeadLogProbs.apply = real_apply
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    groups = [[1, 3, 5], [4, 6], [0, 2, 7]]  # 3-8 tokens, 66-70, 140-150
    assert head_rows == [sum(lengths)]  # the head scores real tokens only
    assert batch_sizes == ([3] if share and not checkpointing else []) + [len(g) for g in groups], batch_sizes
    assert torch.all(logps[cmask == 0] == 0) and torch.all(entropy[cmask == 0] == 0)

    model.zero_grad()
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions_from_mask(attention)).logits
    log_p = torch.log_softmax(logits[:, -t - 1:-1] / 0.7, dim=-1)
    full = log_p.gather(-1, input_ids[:, -t:, None]).squeeze(-1)
    (full * cmask * weights).sum().backward()
    torch.testing.assert_close(logps * cmask, full * cmask, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(entropy * cmask, -(log_p.exp() * log_p).sum(-1) * cmask, rtol=1e-10, atol=1e-12)
    tolerance = 1e-6 if share and not checkpointing else 1e-8  # as in the shared-prompt test above
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=tolerance, atol=tolerance * p.grad.abs().max(), msg=name)


def test_distinct_prompts_or_the_switch_off_run_rows_whole(tiny_model):
    model, tokenizer = tiny_model
    prompts = _prompts(tokenizer)
    batch_sizes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: batch_sizes.append(out.shape[0]))
    with torch.no_grad():
        input_ids, attention, cmask = pack(prompts, [[7], [8, 9], [10]], 0, "cpu")
        completion_logps(model, input_ids, attention, cmask.shape[1])
        input_ids, attention, cmask = pack([prompts[0]] * 4, [[7], [8, 9], [10], [11]], 0, "cpu")
        shared, _ = completion_logps(model, input_ids, attention, cmask.shape[1])
        whole, _ = completion_logps(model, input_ids, attention, cmask.shape[1], share_prompts=False)
    hook.remove()
    assert batch_sizes == [3, 1, 4, 4]
    torch.testing.assert_close(shared * cmask, whole * cmask, rtol=1e-5, atol=1e-6)


def _plain_head(hidden, weight, bias, targets, temperature):
    """Autograd through the whole logits: the reference for the LM head's hand-written backward."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    logits = (logits.float() if logits.dtype == torch.bfloat16 else logits) / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs.gather(-1, targets[:, None]).squeeze(-1), -(logprobs.exp() * logprobs).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("seed", [0, 1])
def test_head_logps_entropy_and_gradients_match_autograd_in_float64(temperature, seed):
    """Token log-probs, entropies and the gradients of hidden states, weight and bias (which no Llama head has)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(9, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(40, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 40, (9,), generator=gen)
    upstream = torch.randn(9, generator=gen, dtype=torch.float64)

    logps, entropy = _HeadLogProbs.apply(hidden, weight, bias, targets, temperature, False)
    (logps * upstream).sum().backward()
    got = [hidden.grad.clone(), weight.grad.clone(), bias.grad.clone()]
    for t in (hidden, weight, bias):
        t.grad = None
    want_logps, want_entropy = _plain_head(hidden, weight, bias, targets, temperature)
    (want_logps * upstream).sum().backward()
    torch.testing.assert_close(logps, want_logps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entropy, want_entropy, rtol=1e-12, atol=1e-12)
    assert not entropy.requires_grad
    for name, g, t in zip(("hidden", "weight", "bias"), got, (hidden, weight, bias), strict=True):
        torch.testing.assert_close(g, t.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_head_under_bf16_autocast_matches_autograd():
    """Under autocast the backward recomputes the logits in bf16 as the forward did; gradients as plain autograd's."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(8, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (8,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps, _ = _HeadLogProbs.apply(hidden, weight, None, targets, 0.8, False)
        logps.sum().backward()
        got = hidden.grad.clone(), weight.grad.clone()
        hidden.grad = weight.grad = None
        want, _ = _plain_head(hidden, weight, None, targets, 0.8)
        want.sum().backward()
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, want, rtol=1e-6, atol=1e-6)  # the same bf16 logits, summed another way
    for g, t in zip(got, (hidden, weight), strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, t.grad, rtol=2e-2, atol=2e-2 * t.grad.abs().max().item())


def test_autocast_head_runs_on_one_bf16_copy_with_the_gradients_of_autocasts_own_path(tiny_model, monkeypatch):
    """Under bf16 autocast the head's weight is cast once per call (not once per chunk and again in each chunk's
    backward); log-probs, entropies and every parameter's gradient match autocast's own per-chunk path within bf16
    rounding, and the head weight's gradient is float32."""
    from grpokit.models import logprobs as module

    model, tokenizer = tiny_model
    model.train()
    ids = torch.tensor([tokenizer("abc 12 + 7 = 19")["input_ids"]] * 2 + [tokenizer("xyz 3 * 4 = 120")["input_ids"]])
    attention = torch.ones_like(ids)
    casts = []
    real = module._lowp_head
    monkeypatch.setattr(module, "_lowp_head", lambda head: casts.append(1) or real(head))

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps, entropy = completion_logps(model, ids, attention, 8, temperature=0.7, chunk_size=3)
        (logps * torch.linspace(-1, 1, logps.numel()).view_as(logps)).sum().backward()
        return logps.detach(), entropy, {n: p.grad.clone() for n, p in model.named_parameters()}

    lowp = run()
    assert len(casts) == 1  # 24 positions in chunks of 3: one cast
    monkeypatch.setattr(module, "_lowp_head", lambda head: None)  # autocast's own path, as before
    plain = run()
    torch.testing.assert_close(lowp[0], plain[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(lowp[1], plain[1], rtol=0, atol=1e-5)
    assert lowp[2]["lm_head.weight"].dtype == torch.float32
    for name, grad in plain[2].items():
        torch.testing.assert_close(lowp[2][name], grad, rtol=2e-2, atol=2e-2 * grad.abs().max().item(), msg=name)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 64])
@pytest.mark.parametrize("hidden_grad", [True, False])
def test_lowp_head_matches_float64_on_the_rounded_operands(chunk_size, hidden_grad):
    """The head on its bf16 copy, chunk by chunk (uneven last chunk, a bias, a frozen input): log-probs and entropies
    equal float64 math on the bf16-rounded hidden states, weight and bias within the bf16 logits' rounding, and the
    float32 gradients of hidden states, weight and bias within bf16 rounding of the products."""
    gen = torch.Generator().manual_seed(chunk_size)
    hidden = torch.randn(13, 16, generator=gen).requires_grad_(hidden_grad)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    bias = torch.randn(50, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (13,), generator=gen)
    upstream = torch.randn(13, generator=gen)
    lowp = weight.detach().to(torch.bfloat16), bias.detach().to(torch.bfloat16)
    parts = [_HeadLogProbs.apply(hidden[i:i + chunk_size], weight, bias, targets[i:i + chunk_size], 0.8, False, *lowp)
             for i in range(0, 13, chunk_size)]
    logps, entropy = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    (logps * upstream).sum().backward()
    assert weight.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    assert (hidden.grad is not None) is hidden_grad and not entropy.requires_grad

    h64 = hidden.detach().to(torch.bfloat16).double().requires_grad_(True)
    w64 = lowp[0].double().requires_grad_(True)
    b64 = lowp[1].double().requires_grad_(True)
    want_logps, want_entropy = _plain_head(h64, w64, b64, targets, 0.8)
    (want_logps * upstream.double()).sum().backward()
    torch.testing.assert_close(logps.double(), want_logps.detach(), rtol=0, atol=0.05)
    torch.testing.assert_close(entropy.double(), want_entropy.detach(), rtol=0, atol=0.05)
    pairs = [(weight.grad, w64.grad), (bias.grad, b64.grad)] + ([(hidden.grad, h64.grad)] if hidden_grad else [])
    for got, want in pairs:
        torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=3e-2 * want.abs().max().item())
