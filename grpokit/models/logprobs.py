"""Per-token log-probs and entropies of completion tokens, without the full logits tensor.

The decoder runs once over prompt + completion; the LM head, log-softmax and entropy then run
over chunks of `chunk_size` completion positions. Under autograd each chunk goes through
`_HeadLogProbs`, whose backward keeps only the hidden states and recomputes one chunk's logits at a
time: the [B, T, V] float32 logits are never held in memory. Prompt positions never reach the LM head.

Log-probs are of logits / temperature, the distribution the sampler drew from (as in TRL).
Models whose head applies more than a linear layer (logit soft-capping or scaling) take the plain
path: the model's own logits, restricted to the completion positions.

Rows that share a prompt (the G completions of a group) share its forward pass: each distinct prompt
runs once, its KV cache is indexed out to its rows, and the completions run on top of it. Autograd
flows through the indexing, so gradients are those of G separate forwards, summed, and the prompt's
activations are stored once instead of G times. With gradient checkpointing (transformers drops the
cache inside checkpointed layers) or caches other than plain growable ones (sliding windows) the rows run whole.

Completions that stop at their own lengths are padded to the longest. The padding never reaches the LM head (only
real completion tokens are scored; padded positions get log-prob and entropy 0), and rows of very different
lengths run the decoder in groups of similar length (`length_buckets`), each padded to its own longest: the
same log-probs and gradients, with fewer padded positions computed.
"""

from __future__ import annotations

import copy
import functools
import inspect

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from grpokit.models import attention, cpu_linear


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: 0 at each row's first real token."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _has_plain_head(model: torch.nn.Module) -> bool:
    cfg = model.config
    return (getattr(cfg, "final_logit_softcapping", None) is None and getattr(cfg, "logit_scale", None) is None
            and model.get_output_embeddings() is not None and hasattr(model, "get_decoder"))


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool,
                 lowp: tuple[torch.Tensor, torch.Tensor | None] | None) -> torch.Tensor:
    """One chunk's logits [C, V], at least float32. `lowp`: the head's weight and bias already cast to the autocast
    dtype (what autocast would multiply), used as they are instead of autocast casting the weight per chunk."""
    if lowp is not None:
        with torch.autocast(hidden.device.type, enabled=False):
            return torch.nn.functional.linear(hidden.to(lowp[0].dtype), *lowp).float()
    return _at_least_fp32((cpu_linear.linear if onednn else torch.nn.functional.linear)(hidden, weight, bias))


def _lowp_head(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Under autocast, the head's float32 weight and bias cast once to the autocast dtype (None otherwise).

    autocast casts a weight once per autocast region and caches it, but the head's backward below recomputes each
    chunk's logits in regions of its own: the 49152 x 576 head of SmolLM2 was cast (and its transpose copied) once
    per chunk, about a quarter of a bf16 update's time on CPU."""
    device_type = head.weight.device.type
    if not torch.is_autocast_enabled(device_type) or head.weight.dtype != torch.float32:
        return None
    dtype = torch.get_autocast_dtype(device_type)
    with torch.no_grad():
        return head.weight.detach().to(dtype), None if head.bias is None else head.bias.detach().to(dtype)


def _head_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                temperature: float, onednn: bool, lowp: tuple[torch.Tensor, torch.Tensor | None] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token log-probs [C], entropies [C], log-normalisers [C]) of one chunk of hidden states [C, H].

    Two [C, V] tensors at most, both written in place: the shifted logits s = logit / T - max and e = exp(s);
    with Z = sum e, log p = s - log Z and the entropy is log Z - sum(e * s) / Z (e * s written over e)."""
    shifted = _head_logits(hidden, weight, bias, onednn, lowp)
    if temperature != 1.0:
        shifted = shifted.div_(temperature)  # [C, V], in place: a fresh tensor
    peak = shifted.amax(dim=-1, keepdim=True)  # [C, 1]
    shifted.sub_(peak)
    unnormalised = shifted.exp()  # [C, V]
    total = unnormalised.sum(dim=-1)  # [C]
    log_total = total.log()
    token_logps = shifted.gather(-1, targets[:, None]).squeeze(-1) - log_total
    weighted = unnormalised.mul_(shifted).sum(dim=-1)  # [C]: sum e * s, in place (about 4x faster than a bmm of dots)
    entropy = log_total - weighted / total
    return token_logps, entropy, peak.squeeze(-1) + log_total


def _grad_logits(ctx, logits: torch.Tensor, normaliser: torch.Tensor, grad_logps: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
    """d loss / d logits [C, V] of a chunk from its recomputed float32 logits, written over them: g ([v = t] - p_v)
    over the temperature."""
    if ctx.temperature != 1.0:
        logits.div_(ctx.temperature)
    grad_logits = logits.sub_(normaliser[:, None]).exp_().mul_(-grad_logps[:, None])  # -g p, in place
    grad_logits.scatter_add_(-1, targets[:, None], grad_logps[:, None])  # + g at the token
    if ctx.temperature != 1.0:
        grad_logits.div_(ctx.temperature)
    return grad_logits


class _HeadLogProbs(torch.autograd.Function):
    """Token log-probs of a chunk through the LM head, with a hand-written backward that recomputes the chunk's
    logits instead of storing them: saves the hidden states, targets and log-normalisers only. d logp_t / d logit_v
    = [v = t] - p_v (over temperature), so the backward needs one pass over [C, V] besides the matrix products.
    Replaces autograd through log_softmax + gather under torch.utils.checkpoint, which recomputed the entropy and
    made several [C, V] temporaries (about a third of a 135M model's update on CPU)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, onednn, lowp_weight=None, lowp_bias=None):
        ctx.device_type = hidden.device.type
        ctx.autocast = torch.is_autocast_enabled(ctx.device_type)  # the backward recomputes the logits alike
        ctx.autocast_dtype = torch.get_autocast_dtype(ctx.device_type)
        lowp = None if lowp_weight is None else (lowp_weight, lowp_bias)
        token_logps, entropy, normaliser = _head_logps(hidden, weight, bias, targets, temperature, onednn, lowp)
        ctx.save_for_backward(hidden, weight, bias, targets, normaliser, lowp_weight, lowp_bias)
        ctx.temperature, ctx.onednn = temperature, onednn
        ctx.mark_non_differentiable(entropy)
        return token_logps, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, _grad_entropy):
        hidden, weight, bias, targets, normaliser, lowp_weight, lowp_bias = ctx.saved_tensors
        if lowp_weight is not None:
            return _HeadLogProbs._lowp_backward(ctx, grad_logps, hidden, weight, bias, targets, normaliser,
                                                lowp_weight, lowp_bias)
        linear = cpu_linear.linear if ctx.onednn else torch.nn.functional.linear
        with torch.autocast(ctx.device_type, dtype=ctx.autocast_dtype, enabled=ctx.autocast):
            logits = _at_least_fp32(linear(hidden, weight, bias))  # [C, V], recomputed as in forward
            grad_logits = _grad_logits(ctx, logits, normaliser, grad_logps, targets)
            grad_logits = grad_logits.to(ctx.autocast_dtype if ctx.autocast else weight.dtype)
            grad_hidden = grad_weight = grad_bias = None
            if ctx.needs_input_grad[0]:
                grad_hidden = linear(grad_logits, weight.t().to(grad_logits.dtype)).to(hidden.dtype)  # [C, H]
            if ctx.needs_input_grad[1]:
                grad_weight = linear(grad_logits.t(), hidden.t().to(grad_logits.dtype)).to(weight.dtype)  # [V, H]
            if bias is not None and ctx.needs_input_grad[2]:
                grad_bias = grad_logits.sum(0).to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None

    @staticmethod
    def _lowp_backward(ctx, grad_logps, hidden, weight, bias, targets, normaliser, lowp_weight, lowp_bias):
        """The backward on the head's low-precision copy: the products autocast's backward computes (operands in
        the copy's dtype), the transposes read in place by `mm` instead of copied."""
        with torch.autocast(ctx.device_type, enabled=False):
            lowp_hidden = hidden.to(lowp_weight.dtype)
            logits = torch.nn.functional.linear(lowp_hidden, lowp_weight, lowp_bias).float()  # as in forward
            grad_logits = _grad_logits(ctx, logits, normaliser, grad_logps, targets).to(lowp_weight.dtype)
            grad_hidden = grad_weight = grad_bias = None
            if ctx.needs_input_grad[0]:
                grad_hidden = torch.mm(grad_logits, lowp_weight).to(hidden.dtype)  # [C, V] @ [V, H]
            if ctx.needs_input_grad[1]:
                grad_weight = torch.mm(grad_logits.t(), lowp_hidden).to(weight.dtype)  # [V, C] @ [C, H]
            if bias is not None and ctx.needs_input_grad[2]:
                grad_bias = grad_logits.sum(0).to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def with_cache(module: torch.nn.Module, cache) -> dict:
    """The keyword that hands `cache` to `module`'s forward: `cache=` where transformers has it (5.2x; its old name
    `past_key_values` warns and goes in 5.40), `past_key_values=` where it does not (a model's own forward, such as
    remote code written for older releases)."""
    target = module.get_base_model() if hasattr(module, "get_base_model") else module  # a peft model passes it on
    return {_cache_keyword(type(target)): cache}


@functools.cache
def _cache_keyword(module_type: type) -> str:
    return "cache" if "cache" in inspect.signature(module_type.forward).parameters else "past_key_values"


def returned_cache(output):
    """The cache a forward returned (`output.cache`, or `past_key_values` before transformers renamed it)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _prompt_cache(model: torch.nn.Module):
    """An empty DynamicCache of plain (full-attention, growable) layers for `model`, or None if it has other kinds."""
    if attention.checkpointing(model):
        return None  # checkpointed layers drop the cache
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if supports is not None and not supports():
        return None
    try:
        cache = DynamicCache(config=model.config)
    except (TypeError, ValueError, AttributeError):
        return None
    return cache if all(type(layer) is DynamicLayer for layer in cache.layers) else None


# a decoder call per group of rows must save at least this many padded token positions (`length_buckets`)
BUCKET_MIN_SAVING = 64


def length_buckets(lengths: list[int], min_saving: int = BUCKET_MIN_SAVING) -> list[list[int]]:
    """Rows (indices into `lengths`, each group in ascending length) grouped so that the token positions computed,
    each group padded to its longest row, plus `min_saving` per group beyond the first, are fewest. The optimum is
    contiguous in sorted order (a row moved to a group of longer rows never costs less), found exactly in O(B^2)."""
    order = sorted(range(len(lengths)), key=lambda r: lengths[r])
    sizes = [max(lengths[r], 1) for r in order]
    best, cut = [0] + [None] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end):  # rows order[start:end] padded to sizes[end - 1]
            cost = best[start] + (end - start) * sizes[end - 1] + (min_saving if start else 0)
            if best[end] is None or cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(order)
    while end:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


def _rows_of(cache, index: torch.Tensor):
    """A new cache holding rows `index` of `cache` (differentiable indexing); `cache` is left as it is."""
    rows = copy.copy(cache)
    rows.layers = [copy.copy(layer) for layer in cache.layers]
    rows.batch_select_indices(index)
    return rows


def _shared_prompt_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          completion_length: int) -> torch.Tensor | None:
    """[B, T, H] hidden states predicting the completion tokens, each distinct prompt run once; None = not shared.
    Positions past a row's completion hold zeros where its group of rows (`length_buckets`) was shorter."""
    width_p = input_ids.shape[1] - completion_length
    cache = _prompt_cache(model) if width_p else None
    if cache is None:
        return None
    prompt_mask = attention_mask[:, :width_p]
    keys = torch.cat([input_ids[:, :width_p] * prompt_mask, prompt_mask], dim=1)  # pad ids do not make prompts differ
    distinct, row_prompt = torch.unique(keys, dim=0, return_inverse=True)  # [U, 2P], [B]
    if len(distinct) == len(keys):
        return None
    prompt_ids, prompt_mask = distinct[:, :width_p], distinct[:, width_p:]
    decoder = model.get_decoder()
    prompt_out = decoder(input_ids=prompt_ids, attention_mask=prompt_mask,
                         position_ids=positions_from_mask(prompt_mask), use_cache=True, **with_cache(decoder, cache))
    buckets = length_buckets(attention_mask[:, width_p:].sum(-1).tolist())
    if len(buckets) == 1:
        cache.batch_select_indices(row_prompt)  # [U, ...] -> [B, ...]; differentiable indexing
        positions = prompt_mask.sum(-1)[row_prompt, None] + torch.arange(completion_length, device=input_ids.device)
        completion_out = decoder(input_ids=input_ids[:, width_p:], attention_mask=attention_mask,
                                 position_ids=positions, use_cache=True, **with_cache(decoder, cache))
        last_prompt = prompt_out.last_hidden_state[row_prompt, -1:]  # predicts completion token 0
        return torch.cat([last_prompt, completion_out.last_hidden_state[:, :-1]], dim=1)
    pieces = []
    for rows in buckets:  # each group of rows on its own copy of the prompts' cache, to its own longest completion
        index = torch.tensor(rows, device=input_ids.device)
        length = max(1, int(attention_mask[index, width_p:].sum(-1).max()))
        prompts = row_prompt[index]
        positions = prompt_mask.sum(-1)[prompts, None] + torch.arange(length, device=input_ids.device)
        rows_cache = _rows_of(cache, prompts)
        out = decoder(input_ids=input_ids[index, width_p:width_p + length],
                      attention_mask=attention_mask[index, :width_p + length], position_ids=positions,
                      use_cache=True, **with_cache(decoder, rows_cache))
        hidden = torch.cat([prompt_out.last_hidden_state[prompts, -1:], out.last_hidden_state[:, :-1]], dim=1)
        pieces.append(torch.nn.functional.pad(hidden, (0, 0, 0, completion_length - length)))
    return _in_row_order(pieces, buckets)


def _in_row_order(pieces: list[torch.Tensor], buckets: list[list[int]]) -> torch.Tensor:
    """The groups' [rows, ...] results back in the rows' original order (differentiable)."""
    order = torch.tensor([r for rows in buckets for r in rows], device=pieces[0].device)
    return torch.cat(pieces).index_select(0, torch.argsort(order))


def _whole_rows_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       positions: torch.Tensor, completion_length: int) -> torch.Tensor:
    """[B, T, H] hidden states predicting the completion tokens, every row run whole (prompt and completion), in
    groups of similar completion length (`length_buckets`) where the completions have a prompt before them."""
    decoder = model.get_decoder()
    width_p = input_ids.shape[1] - completion_length
    buckets = length_buckets(attention_mask[:, width_p:].sum(-1).tolist()) if width_p else [[]]
    if len(buckets) == 1:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         use_cache=False).last_hidden_state  # [B, P + T, H]
        return hidden[:, -completion_length - 1:-1]  # the states that predict each completion token
    pieces = []
    for rows in buckets:
        index = torch.tensor(rows, device=input_ids.device)
        length = max(1, int(attention_mask[index, width_p:].sum(-1).max()))
        hidden = decoder(input_ids=input_ids[index, :width_p + length],
                         attention_mask=attention_mask[index, :width_p + length],
                         position_ids=positions[index, :width_p + length], use_cache=False).last_hidden_state
        pieces.append(torch.nn.functional.pad(hidden[:, width_p - 1:-1], (0, 0, 0, completion_length - length)))
    return _in_row_order(pieces, buckets)


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_length: int,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids/attention_mask [B, P + T] (prompt left-padded, completion right-padded), T = completion_length.

    Returns (logps [B, T], entropy [B, T]) for the completion tokens input_ids[:, P:].
    """
    temperature = temperature if temperature > 0 else 1.0
    positions = positions_from_mask(attention_mask)
    targets = input_ids[:, -completion_length:]  # [B, T]
    if not _has_plain_head(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                       logits_to_keep=completion_length + 1, use_cache=False).logits[:, :-1]  # [B, T, V]
        logprobs = torch.log_softmax(_at_least_fp32(logits) / temperature, dim=-1)
        entropy = -(logprobs.exp() * logprobs).sum(-1).detach()
        return logprobs.gather(-1, targets[..., None]).squeeze(-1), entropy

    with attention.training_attention(model):  # short sequences' attention in large products on CPU
        hidden = _shared_prompt_hidden(model, input_ids, attention_mask, completion_length) if share_prompts else None
        if hidden is None:
            hidden = _whole_rows_hidden(model, input_ids, attention_mask, positions, completion_length)
    batch, length, width = hidden.shape
    flat_hidden = hidden.reshape(batch * length, width)
    flat_targets = targets.reshape(batch * length)
    real = attention_mask[:, -completion_length:].reshape(batch * length).nonzero().squeeze(-1)  # scored positions
    padded = 0 < len(real) < batch * length
    if padded:  # padding never reaches the head
        flat_hidden, flat_targets = flat_hidden.index_select(0, real), flat_targets.index_select(0, real)
    head = model.get_output_embeddings()
    onednn = isinstance(head, cpu_linear.OneDNNLinear)  # the head's own kernel choice (grpokit.models.cpu_linear)
    lowp = _lowp_head(head)
    logps, entropies = [], []
    for start in range(0, len(flat_hidden), chunk_size):
        h = flat_hidden[start:start + chunk_size]
        t = flat_targets[start:start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad):
            lp, ent = _HeadLogProbs.apply(h, head.weight, head.bias, t, temperature, onednn, *(lowp or ()))
        else:
            lp, ent, _ = _head_logps(h, head.weight, head.bias, t, temperature, onednn, lowp)
        logps.append(lp)
        entropies.append(ent)
    logps, entropies = torch.cat(logps), torch.cat(entropies)
    if padded:  # padded positions: log-prob and entropy 0 (every consumer masks them)
        logps = logps.new_zeros(batch * length).index_copy(0, real, logps)
        entropies = entropies.new_zeros(batch * length).index_copy(0, real, entropies)
    return logps.view(batch, length), entropies.view(batch, length)


class CompletionLogProbs(torch.nn.Module):
    """`completion_logps` of a model as one module call, so a data-parallel wrapper (DDP, FSDP) sees one forward
    per backward: the decoder and the LM head run as separate calls inside it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_length: int,
                temperature: float, chunk_size: int, share_prompts: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return completion_logps(self.model, input_ids, attention_mask, completion_length, temperature, chunk_size,
                                share_prompts)
