"""In-process sampler on the policy module itself (CPU or CUDA).

Each prompt is prefilled once and its KV cache repeated for its n samples; decoding is batched
over all B*n rows with left padding, and rows that have finished are dropped from the batch (and
the cache) so they stop costing compute. Because the engine runs on the policy module, there are
no weights to sync after an optimizer step.

Recorded log-probs are those of the temperature-scaled distribution before top-k / top-p
filtering, which is the distribution the trainer scores (as in TRL).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from grpokit.rollout.base import FinishReason, Rollout, SamplingParams


class TorchEngine:
    def __init__(self, model: torch.nn.Module, pad_token_id: int):
        self.model = model
        self.pad_token_id = pad_token_id

    def load_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # same module as the policy: nothing to copy

    def close(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> Rollout:
        model = self.model
        was_training = model.training
        model.eval()
        try:
            return self._generate(prompt_ids, n, params)
        finally:
            model.train(was_training)

    def _generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> Rollout:
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("generate() needs at least one prompt, each with at least one token")
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device)
        if params.seed is None:
            generator.seed()  # non-deterministic, and leaves torch's global RNG alone
        else:
            generator.manual_seed(params.seed)
        stop_ids = torch.tensor(sorted(set(params.stop_token_ids)) or [-1], device=device)

        width = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad_token_id, dtype=torch.long, device=device)
        attention = torch.zeros_like(input_ids)
        for i, ids in enumerate(prompt_ids):
            input_ids[i, width - len(ids):] = torch.tensor(ids, device=device)
            attention[i, width - len(ids):] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # [B, L]

        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        if n > 1:
            cache.batch_repeat_interleave(n)
        logits = out.logits[:, -1].float().repeat_interleave(n, dim=0)  # [N, V]
        attention = attention.repeat_interleave(n, dim=0)  # [N, L]
        next_pos = positions[:, -1].repeat_interleave(n, dim=0) + 1  # [N]

        total = len(prompt_ids) * n
        tokens: list[list[int]] = [[] for _ in range(total)]
        logps: list[list[float]] = [[] for _ in range(total)]
        finish: list[FinishReason] = ["length"] * total
        rows = torch.arange(total, device=device)  # original row of each live batch entry

        for step in range(params.max_tokens):
            token, token_logp = _sample(logits, params, generator)  # [N], [N]
            for row, tok, lp in zip(rows.tolist(), token.tolist(), token_logp.tolist(), strict=True):
                tokens[row].append(tok)
                logps[row].append(lp)
            stopped = torch.isin(token, stop_ids)
            for row in rows[stopped].tolist():
                finish[row] = "stop"
            if step == params.max_tokens - 1 or bool(stopped.all()):
                break
            if bool(stopped.any()):
                keep = (~stopped).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                rows, token, attention, next_pos = rows[keep], token[keep], attention[keep], next_pos[keep]
            attention = torch.cat([attention, attention.new_ones(len(rows), 1)], dim=-1)
            out = self.model(input_ids=token[:, None], attention_mask=attention, position_ids=next_pos[:, None],
                             past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1].float()
            next_pos = next_pos + 1
        return Rollout(completion_ids=tokens, sampler_logps=logps, finish_reasons=finish, group_size=n)


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; returns (token [N], log-prob [N] under logits / temperature)."""
    if params.temperature == 0:
        logprobs = torch.log_softmax(logits, dim=-1)
        token = logits.argmax(dim=-1)
        return token, logprobs.gather(-1, token[:, None]).squeeze(-1)
    scaled = logits / params.temperature
    logprobs = torch.log_softmax(scaled, dim=-1)  # [N, V]
    filtered = scaled
    if params.top_k > 0 and params.top_k < filtered.shape[-1]:
        kth = torch.topk(filtered, params.top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(filtered, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keeps the top token always
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        filtered = filtered.masked_fill(drop, float("-inf"))
    probs = torch.softmax(filtered, dim=-1)
    token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1)
