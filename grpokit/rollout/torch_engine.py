"""In-process sampler on the policy module itself (CPU or CUDA).

Each prompt is prefilled once and its KV cache repeated for its n samples (on the fused float32 step and the bf16
step, held once and read once for its rows instead: `decode.SharedPrefixCache`, `decode.SharedBF16Cache`);
decoding is batched over all B*n rows with left padding. Sampled tokens and log-probs go into preallocated [B*n, T]
tensors, copied to Python lists once at the end. Finished rows stay in the batch (their outputs
ignored) until at least `_COMPACT_FRACTION` of the batch has finished; then they are dropped from
the batch and the KV cache in one copy. Because the engine runs on the policy module, there are no
weights to sync after an optimizer step.

Three things keep the decode step to the model's own work (grpokit.rollout.decode,
grpokit.models.cpu_linear): the KV cache is preallocated for the whole completion and written in place
(transformers' cache copies itself with `torch.cat` every step; on any device), single-token attention
on CPU runs as two batched matmuls instead of torch's SDPA kernel (whose per-call setup dominated at
one query token), and float32 linear layers use weights reordered once per call: into oneDNN's blocked
layout where they run on oneDNN (cpu_linear onednn, auto on AMD), packed for MKL's packed GEMM and the batch's
row count under cpu_linear auto elsewhere. The sampling weights go into one [N, V] buffer reused every step.

On CPU, Llama-family models (grpokit.models.decoder: Llama, Mistral, Qwen2, Qwen3, unwrapped float32 weights) decode
on a lean forward instead of the model's own: the same operations in float32 (bit for bit the model's logits on the
same linear layers, tested); where cpu_linear auto packs for MKL, the same float32 math with each layer's
query/key/value and gate/up products fused, on copies packed once per call and again as the batch halves (the
decoder's, not the layers'); and under bf16 autocast a bf16 path with fused products on weights cast and packed once
per call, its own bf16 KV cache and no per-token casts (its prefill too). Other models, LoRA-wrapped layers and CUDA
take the model's forward.

Sampling draws one uniform number per row and step and inverts the filtered distribution's CDF
(cumsum + searchsorted) instead of `torch.multinomial`, which on CPU draws an exponential variate
for every vocabulary entry (about half of a 135M model's step time at batch 64). Top-p looks for
the nucleus among the 1024 most likely tokens and sorts the whole vocabulary only for rows whose
nucleus is larger.

Deliberate choices:
- Recorded log-probs are those of logits / temperature, before repetition penalty and before
  top-k / top-p / min-p filtering: the distribution the trainer recomputes (grpokit.models.logprobs,
  as in TRL). With a repetition penalty or a filter the sampler draws from a different
  distribution than the one recorded; the trainer's importance ratio does not correct for that.
- A stop string ends a completion at the token that completed it: the ids up to and including
  that token are kept (the trainer scores exactly the ids that were sampled), finish reason "stop".
  Stop strings are matched in the decoded completion only, never across the prompt boundary.
- Reproducibility: each row's uniforms come from its own generator, seeded from (seed, prompt ids,
  how many earlier rows of the batch have the same prompt, sample index). The same prompts, params
  and seed give the same completions; a prompt's completions also do not depend on the other
  prompts in the batch, except where batching changes floating-point results enough to move a
  draw across a CDF boundary or flip a greedy argmax near-tie.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import secrets

import torch
from transformers import DynamicCache

from grpokit.models import cpu_linear, decoder
from grpokit.models.cpu_linear import check_mode as check_cpu_linear
from grpokit.models.logprobs import returned_cache, with_cache
from grpokit.rollout import decode
from grpokit.rollout.base import FinishReason, Rollout, SamplingParams
from grpokit.runtime import allocator

_COMPACT_FRACTION = 0.1  # drop finished rows once this fraction of the batch has finished (benchmarks/RESULTS.md)
_TOP_P_CANDIDATES = 1024  # top-p searches the nucleus among this many tokens before sorting the vocabulary


class TorchEngine:
    def __init__(self, model: torch.nn.Module, pad_token_id: int, *, tokenizer=None, cpu_linear: str = "auto"):
        self.model = model
        self.pad_token_id = pad_token_id
        self.tokenizer = tokenizer  # only needed for stop strings
        # the run's cpu_linear: under auto on Intel CPUs the decode products run packed
        self.cpu_linear = check_cpu_linear(cpu_linear, "TorchEngine(cpu_linear)")

    def load_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # same module as the policy: nothing to copy

    def close(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams, *,
                 samples: list[range] | None = None) -> Rollout:
        """n completions per prompt; `samples` draws only some of each prompt's n (sample indices, e.g. range(2, 4)),
        with the same random streams those samples get in a full call: a group split across processes."""
        if samples is not None and (len(samples) != len(prompt_ids) or any(r.start < 0 or r.stop > n for r in samples)):
            raise ValueError(f"samples must give one range within [0, {n}) per prompt, got {samples}")
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("generate() needs at least one prompt, each with at least one token")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"SamplingParams.stop={params.stop!r} needs the completion text: "
                             "create the engine with TorchEngine(model, pad_token_id, tokenizer=tokenizer)")
        model = self.model
        was_training = model.training
        model.eval()
        lean = lean_mode(model)
        rows = n * len(prompt_ids) if samples is None else sum(len(r) for r in samples)
        mkl_rows = cpu_linear.mkl_rows(self.cpu_linear, next(model.parameters()).device, rows)
        try:
            lean_decoder = None if lean is None else decoder.LeanDecoder(model, bf16=lean == "bf16", mkl_rows=mkl_rows)
            # the lean bf16 path, and the lean float32 one on MKL, hold their own packed weights: no per-layer copies
            own = lean_decoder is not None and (lean_decoder.bf16 or lean_decoder.mkl is not None)
            with decode.decode_attention(model), (contextlib.nullcontext() if own
                                                  else cpu_linear.packed_weights(model, mkl_rows=mkl_rows)):
                rollout = self._generate(prompt_ids, n, params, samples, lean_decoder,
                                         refit=mkl_rows is not None and not own)
        finally:
            model.train(was_training)
        del lean_decoder  # its packed copies: freed before the release below
        if mkl_rows is not None:  # the MKL-packed copies are free now: tcmalloc would keep them resident
            allocator.release_free_memory()
        return rollout

    def _generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams,
                  samples: list[range] | None, lean: decoder.LeanDecoder | None, refit: bool = False) -> Rollout:
        """refit: the model's layers are packed for MKL (`cpu_linear.packed_weights`): refit them as the batch
        shrinks."""
        device = next(self.model.parameters()).device
        counts = [n] * len(prompt_ids) if samples is None else [len(r) for r in samples]
        total, steps = sum(counts), params.max_tokens
        stop_ids = torch.tensor(sorted(set(params.stop_token_ids)) or [-1], device=device)
        uniforms = None
        if params.temperature != 0:
            uniforms = row_uniforms(prompt_ids, n, steps, params.seed)
            if samples is not None:  # the rows of a full call that this call draws
                uniforms = uniforms[[i * n + j for i, r in enumerate(samples) for j in r]]
            uniforms = uniforms.to(device)

        width = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad_token_id, dtype=torch.long, device=device)
        attention = torch.zeros((len(prompt_ids), width + steps), dtype=torch.long, device=device)
        for i, ids in enumerate(prompt_ids):
            input_ids[i, width - len(ids):] = torch.tensor(ids, device=device)
            attention[i, width - len(ids):] = 1  # generated positions are all real tokens
        positions = (attention[:, :width].cumsum(-1) - 1).clamp(min=0)  # [B, L]

        if lean is not None and lean.bf16:
            with torch.autocast(device.type, enabled=False):
                logits, cache = lean.prefill(input_ids, attention[:, :width], positions)
        else:
            cache = DynamicCache(config=self.model.config)
            out = self.model(input_ids=input_ids, attention_mask=attention[:, :width], position_ids=positions,
                             use_cache=True, logits_to_keep=1, **with_cache(self.model, cache))
            cache, logits = returned_cache(out), out.logits[:, -1].float()
        repeats = torch.tensor(counts, device=device)
        groups = lean is not None and counts[0] > 1 and len(set(counts)) == 1  # rows in equal groups of a prompt
        if groups and lean.bf16 and decode.SharedBF16Cache.applies(cache):  # the bf16 step reads each prompt once
            cache = decode.SharedBF16Cache(cache, counts[0])
        elif groups and lean.mkl is not None and decode.SharedPrefixCache.applies(cache):  # the fused step: the same
            padding = None if bool(attention[:, :width].all()) else attention[:, :width] == 0
            cache = decode.SharedPrefixCache(cache, counts[0], steps, padding)
        elif samples is not None:
            cache.batch_select_indices(torch.arange(len(prompt_ids), device=device).repeat_interleave(repeats))
        elif n > 1:
            cache.batch_repeat_interleave(n)
        if not getattr(cache, "shared", False):
            decode.preallocate(cache, steps)
        logits = logits.repeat_interleave(repeats, dim=0)  # [N, V]
        attention = attention.repeat_interleave(repeats, dim=0)  # [N, L + steps]
        pad = None  # [N, 1, 1, L] True at padded prompt positions: the lean decoder's mask
        if lean is not None and not lean.bf16 and not bool(attention[:, :width].all()):
            pad = (attention[:, None, None, :width] == 0)
        next_pos = positions[:, -1].repeat_interleave(repeats, dim=0) + 1  # [N]
        seen = None  # [N, V] tokens of each row's prompt + completion, for the repetition penalty
        if params.repetition_penalty != 1.0:
            seen = torch.zeros((len(prompt_ids), logits.shape[-1]), dtype=torch.bool, device=device)
            for i, ids in enumerate(prompt_ids):
                seen[i, torch.tensor(ids, device=device)] = True
            seen = seen.repeat_interleave(repeats, dim=0)

        completion = torch.full((total, steps), self.pad_token_id, dtype=torch.long, device=device)  # [N, T]
        sampler_logps = torch.zeros((total, steps), dtype=torch.float32, device=device)  # [N, T]
        entropies = torch.zeros((total, steps), dtype=torch.float32, device=device) if params.entropies else None
        lengths = [steps] * total
        finish: list[FinishReason] = ["length"] * total
        stop_text = _StopStrings(self.tokenizer, params.stop, total) if params.stop else None
        rows = torch.arange(total, device=device)  # original row of each batch entry
        live = torch.ones(total, dtype=torch.bool, device=device)  # [N] False once the row has finished
        live_count = total

        work = torch.empty_like(logits) if uniforms is not None else None  # [N, V] sampling weights, reused each step
        for step in range(steps):
            entropy = None if entropies is None else logits.new_empty(len(rows))
            token, token_logp = sample(logits, params, None if uniforms is None else uniforms[rows, step], seen,
                                       None if work is None else work[:len(rows)], entropy)
            completion[rows, step] = token
            sampler_logps[rows, step] = token_logp
            if entropies is not None:
                entropies[rows, step] = entropy
            finished = torch.isin(token, stop_ids) & live  # [N]
            if stop_text is not None:
                finished |= stop_text.hits(rows.tolist(), token.tolist(), live.tolist(), device)
            newly = rows[finished].tolist()  # the step's one host sync
            for row in newly:
                lengths[row], finish[row] = step + 1, "stop"
            live_count -= len(newly)
            if live_count == 0 or step == steps - 1:
                break
            live &= ~finished
            if len(rows) - live_count >= max(1, math.ceil(_COMPACT_FRACTION * len(rows))):
                keep = live.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                if refit:  # weights packed for MKL follow the batch as it halves
                    cpu_linear.fit_packed(self.model, len(keep))
                if lean is not None:
                    lean.fit(len(keep))
                if getattr(cache, "shared", False) and (not cache.regular or not (lean.bf16 or lean.mkl is not None)):
                    cache = cache.materialize()  # groups of unequal size, or off the fused step: keys per row
                rows, token, attention = rows[keep], token[keep], attention[keep]
                next_pos, live = next_pos[keep], live[keep]
                seen = None if seen is None else seen[keep]
                pad = None if pad is None else pad[keep]
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
            if lean is not None:
                with torch.autocast(device.type, enabled=False):
                    logits = lean.step(token, next_pos, cache, pad)
            else:
                out = self.model(input_ids=token[:, None], attention_mask=attention[:, :width + step + 1],
                                 position_ids=next_pos[:, None], use_cache=True, **with_cache(self.model, cache))
                cache = returned_cache(out)
                logits = out.logits[:, -1].float()
            next_pos = next_pos + 1

        ids, logps = completion.tolist(), sampler_logps.tolist()
        ents = None if entropies is None else entropies.tolist()
        return Rollout(completion_ids=[r[:k] for r, k in zip(ids, lengths, strict=True)],
                       sampler_logps=[r[:k] for r, k in zip(logps, lengths, strict=True)],
                       finish_reasons=finish, group_size=n,
                       sampler_entropies=None if ents is None else [r[:k] for r, k in zip(ents, lengths, strict=True)])


def lean_mode(model: torch.nn.Module) -> str | None:
    """Which lean path (grpokit.models.decoder) a generation on `model` takes here: "float32", "bf16" (under bf16
    autocast where oneDNN has bf16), or None (the model's own forward: another architecture, wrapped layers,
    non-float32 weights, CUDA, another autocast)."""
    device = next(model.parameters()).device
    if device.type != "cpu" or decoder.unsupported(model) is not None:
        return None
    if not torch.is_autocast_enabled("cpu"):
        return "float32"
    return "bf16" if cpu_linear._bf16_packing_applies() else None


def sample(logits: torch.Tensor, params: SamplingParams, uniform: torch.Tensor | None,
           seen: torch.Tensor | None = None, work: torch.Tensor | None = None,
           entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row: (token [N], its log-prob [N] under logits / temperature, unpenalised, unfiltered).

    logits [N, V] float32; uniform [N] in [0, 1), None for greedy; seen [N, V] bool for the repetition penalty;
    work: an optional [N, V] float32 buffer for the sampling weights (a decode loop passes one, so no step allocates
    and page-faults a fresh [N, V] tensor); entropy: an optional [N] float32 tensor that receives the entropy of
    the recorded distribution (softmax of logits / temperature), as the trainer computes it.
    """
    temperature = params.temperature if params.temperature > 0 else 1.0
    scaled = logits / temperature if temperature != 1.0 else logits  # [N, V]
    drawn_from = scaled
    if seen is not None:
        drawn_from = apply_repetition_penalty(logits, seen, params.repetition_penalty) / temperature
    if uniform is None:
        token = drawn_from.argmax(dim=-1)
    else:
        filtered = filter_logits(drawn_from, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p)
        if filtered is scaled:  # the weights drawn from are those of the recorded distribution: reuse their sum
            token, top, mass = _draw(filtered, uniform, work, entropy)
            return token, scaled.gather(-1, token[:, None]).squeeze(-1) - (top + mass.log())
        token, _, _ = _draw(filtered, uniform, work)
    normaliser = torch.logsumexp(scaled, dim=-1)  # [N]
    if entropy is not None:  # log Z - sum(p * s): the trainer's formula (grpokit.models.logprobs)
        torch.sub(normaliser, torch.linalg.vecdot(torch.exp(scaled - normaliser[:, None]), scaled), out=entropy)
    token_logp = scaled.gather(-1, token[:, None]).squeeze(-1) - normaliser
    return token, token_logp


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: seen tokens' logits divided by penalty if > 0, else
    multiplied."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(scaled: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Set to -inf the tokens that top-k, then top-p, then min-p remove (transformers' order); scaled [N, V].

    Each filter becomes a per-row floor on the logits, so tokens tied with the last kept one are kept.
    """
    vocab = scaled.shape[-1]
    floor = None  # [N, 1]
    candidates = None  # [N, K] the top-k logits, descending: the whole distribution after top-k
    if 0 < top_k < vocab:
        candidates = scaled.topk(top_k, dim=-1).values
        floor = candidates[:, -1:]
    if top_p < 1.0:
        nucleus = _top_p_floor(scaled, candidates, top_p)
        floor = nucleus if floor is None else torch.maximum(floor, nucleus)
    if min_p > 0.0:
        relative = scaled.amax(dim=-1, keepdim=True) + math.log(min_p)  # p >= min_p * p_max, in log space
        floor = relative if floor is None else torch.maximum(floor, relative)
    return scaled if floor is None else scaled.masked_fill(scaled < floor, float("-inf"))


def _top_p_floor(scaled: torch.Tensor, candidates: torch.Tensor | None, top_p: float) -> torch.Tensor:
    """Lowest logit of the smallest set of most likely tokens whose mass reaches top_p; [N, 1]."""
    if candidates is None:  # no top-k: try the likeliest tokens first, sort the vocabulary only where needed
        candidates = scaled.topk(min(_TOP_P_CANDIDATES, scaled.shape[-1]), dim=-1).values
        normaliser = torch.logsumexp(scaled, dim=-1, keepdim=True)
    else:  # after top-k the candidates are the whole renormalised distribution
        normaliser = torch.logsumexp(candidates, dim=-1, keepdim=True)
    probs = (candidates - normaliser).exp()  # [N, K]
    cumulative = probs.cumsum(dim=-1)
    floor = _nucleus_floor(candidates, cumulative - probs, top_p)
    short = (cumulative[:, -1] < top_p).nonzero().squeeze(-1)  # rows whose nucleus is not among the candidates
    if len(short) and candidates.shape[-1] < scaled.shape[-1]:
        full = scaled[short].sort(dim=-1, descending=True).values
        full_probs = (full - normaliser[short]).exp()
        floor[short] = _nucleus_floor(full, full_probs.cumsum(dim=-1) - full_probs, top_p)
    return floor


def _nucleus_floor(sorted_logits: torch.Tensor, mass_before: torch.Tensor, top_p: float) -> torch.Tensor:
    kept = (mass_before < top_p).sum(dim=-1, keepdim=True).clamp(min=1)  # the top token is always kept
    return sorted_logits.gather(-1, kept - 1)


def draw(filtered: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling from softmax(filtered) [N, V] with one uniform [N] per row; returns token ids [N].

    The drawn index i has cdf[i] > u >= cdf[i - 1], so a token of probability 0 is never drawn.
    """
    return _draw(filtered, uniform)[0]


def _draw(filtered: torch.Tensor, uniform: torch.Tensor, work: torch.Tensor | None = None,
          entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`draw`, also returning each row's max logit and sum of exp(filtered - max) ([N] each): the row's log-normaliser
    is max + log(sum). `work` [N, V] receives the weights and their cumulative sums (a new tensor if None);
    `entropy` [N], if given, the entropy of softmax(filtered) from the same weights (one more pass over them)."""
    top = filtered.amax(dim=-1, keepdim=True)  # [N, 1]
    weights = torch.sub(filtered, top, out=work) if work is not None else filtered - top
    weights.exp_()  # [N, V], unnormalised
    mass = weights.sum(dim=-1)  # pairwise sum: as accurate as logsumexp's
    if entropy is not None:  # log Z - sum(p * s), Z = mass * e^top
        torch.sub(top.squeeze(-1) + mass.log(), torch.linalg.vecdot(weights, filtered) / mass, out=entropy)
    cdf = weights.cumsum_(dim=-1)  # in place: weights are not needed again
    total = cdf[:, -1]
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))  # strictly below total
    return torch.searchsorted(cdf, target[:, None], right=True).squeeze(-1), top.squeeze(-1), mass


def row_uniforms(prompt_ids: list[list[int]], n: int, steps: int, seed: int | None) -> torch.Tensor:
    """[B*n, steps] uniforms in [0, 1), one stream per row, seeded from (seed, prompt, repeat of that prompt, sample).

    A row's stream does not depend on the other prompts of the batch; identical prompts in one batch
    still get different streams.
    """
    base = secrets.randbits(63) if seed is None else seed
    occurrences: dict[tuple[int, ...], int] = {}
    generator = torch.Generator()
    out = torch.empty((len(prompt_ids) * n, steps))
    for i, ids in enumerate(prompt_ids):
        key = tuple(ids)
        repeat = occurrences.get(key, 0)
        occurrences[key] = repeat + 1
        digest = hashlib.blake2b(repr((base, key, repeat)).encode(), digest_size=8).digest()
        for j in range(n):
            generator.manual_seed((int.from_bytes(digest, "little") + j) % (1 << 63))
            out[i * n + j] = torch.rand(steps, generator=generator)
    return out


class _StopStrings:
    """Finds rows whose decoded completion now contains a stop string.

    Only the last few tokens are decoded each step: a stop string ending at the newest token spans
    at most len(stop string) tokens (every token decodes to at least one character); the margin
    keeps tokenizers' start-of-text handling (SentencePiece's leading space) away from the match.
    """

    def __init__(self, tokenizer, stop: list[str], total: int):
        self.tokenizer = tokenizer
        self.stop = stop
        self.window = max(len(s) for s in stop) + 4
        self.completions: list[list[int]] = [[] for _ in range(total)]

    def hits(self, rows: list[int], tokens: list[int], live: list[bool], device: torch.device) -> torch.Tensor:
        found = []
        for row, token, alive in zip(rows, tokens, live, strict=True):
            if not alive:
                found.append(False)
                continue
            ids = self.completions[row]
            ids.append(token)
            text = self.tokenizer.decode(ids[-self.window:], skip_special_tokens=True)
            found.append(any(s in text for s in self.stop))
        return torch.tensor(found, dtype=torch.bool, device=device)
