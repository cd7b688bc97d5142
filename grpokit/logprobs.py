"""Per-token log-probs and entropies of completion tokens, without the full logits tensor.

The decoder runs once over prompt + completion; the LM head, log-softmax and entropy then run
over chunks of `chunk_size` completion positions. Under autograd each chunk is checkpointed, so
backward keeps only the hidden states and recomputes one chunk's logits at a time: the
[B, T, V] float32 logits are never held in memory. Prompt positions never reach the LM head.

Log-probs are of logits / temperature, the distribution the sampler drew from (as in TRL).
Models whose head applies more than a linear layer (logit soft-capping or scaling) take the plain
path: the model's own logits, restricted to the completion positions.

Rows that share a prompt (the G completions of a group) share its forward pass: each distinct prompt
runs once, its KV cache is indexed out to its rows, and the completions run on top of it. Autograd
flows through the indexing, so gradients are those of G separate forwards, summed, and the prompt's
activations are stored once instead of G times. With gradient checkpointing (transformers drops the
cache inside checkpointed layers) or caches other than plain growable ones (sliding windows) the rows run whole.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import DynamicCache, DynamicLayer


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: 0 at each row's first real token."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _has_plain_head(model: torch.nn.Module) -> bool:
    cfg = model.config
    return (getattr(cfg, "final_logit_softcapping", None) is None and getattr(cfg, "logit_scale", None) is None
            and model.get_output_embeddings() is not None and hasattr(model, "get_decoder"))


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.nn.functional.linear(hidden, weight, bias)  # [C, V]
    logprobs = torch.log_softmax(_at_least_fp32(logits) / temperature, dim=-1)
    token_logps = logprobs.gather(-1, targets[:, None]).squeeze(-1)  # [C]
    entropy = -(logprobs.exp() * logprobs).sum(-1).detach()  # [C]
    return token_logps, entropy


def _prompt_cache(model: torch.nn.Module):
    """An empty DynamicCache of plain (full-attention, growable) layers for `model`, or None if it has other kinds."""
    checkpointed = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x name
    if checkpointed is None:
        checkpointed = getattr(model, "is_gradient_checkpointing", False)
    if checkpointed:
        return None  # checkpointed layers drop the cache
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if supports is not None and not supports():
        return None
    try:
        cache = DynamicCache(config=model.config)
    except (TypeError, ValueError, AttributeError):
        return None
    return cache if all(type(layer) is DynamicLayer for layer in cache.layers) else None


def _shared_prompt_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          completion_length: int) -> torch.Tensor | None:
    """[B, T, H] hidden states predicting the completion tokens, each distinct prompt run once; None = not shared."""
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
    prompt_out = decoder(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions_from_mask(prompt_mask),
                         past_key_values=cache, use_cache=True)
    cache.batch_select_indices(row_prompt)  # [U, ...] -> [B, ...]; differentiable indexing
    positions = prompt_mask.sum(-1)[row_prompt, None] + torch.arange(completion_length, device=input_ids.device)
    completion_out = decoder(input_ids=input_ids[:, width_p:], attention_mask=attention_mask, position_ids=positions,
                             past_key_values=cache, use_cache=True)
    last_prompt = prompt_out.last_hidden_state[row_prompt, -1:]  # predicts completion token 0
    return torch.cat([last_prompt, completion_out.last_hidden_state[:, :-1]], dim=1)


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

    hidden = _shared_prompt_hidden(model, input_ids, attention_mask, completion_length) if share_prompts else None
    if hidden is None:
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                     use_cache=False).last_hidden_state  # [B, P + T, H]
        hidden = hidden[:, -completion_length - 1:-1]  # [B, T, H]: the states that predict each completion token
    batch, length, width = hidden.shape
    flat_hidden = hidden.reshape(batch * length, width)
    flat_targets = targets.reshape(batch * length)
    head = model.get_output_embeddings()
    logps, entropies = [], []
    for start in range(0, batch * length, chunk_size):
        h = flat_hidden[start:start + chunk_size]
        t = flat_targets[start:start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            lp, ent = checkpoint(_chunk_logps, h, head.weight, head.bias, t, temperature, use_reentrant=False)
        else:
            lp, ent = _chunk_logps(h, head.weight, head.bias, t, temperature)
        logps.append(lp)
        entropies.append(ent)
    return torch.cat(logps).view(batch, length), torch.cat(entropies).view(batch, length)


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
