"""The data one generation becomes: scored completions, packed micro-batches, and what is left of them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True, kw_only=True)
class MicroBatch:
    input_ids: torch.Tensor  # [M, P + T]
    attention_mask: torch.Tensor  # [M, P + T]
    completion_mask: torch.Tensor  # [M, T]
    advantages: torch.Tensor  # [M]
    old_logps: torch.Tensor | None = None  # [M, T]
    ref_logps: torch.Tensor | None = None  # [M, T]
    step_sequences: int | None = None  # the loss normaliser's counts over the micro-batch's whole optimizer step
    step_tokens: int | None = None  # (every micro-batch of the window, on every process)


@dataclass(slots=True, kw_only=True)
class Generation:
    """Scored completions of whole groups, prompt-major: rows i*G .. i*G+G-1 share a prompt."""

    prompts: list  # [N], the dataset's prompt (text or chat messages) of each completion
    completions: list  # [N], decoded as the rewards saw them
    prompt_ids: list[list[int]]  # [N], one per completion
    completion_ids: list[list[int]]  # [N]
    finish_reasons: list[str]  # [N]
    rewards: torch.Tensor  # [N, K], NaN = not applicable

    def groups(self, keep: list[int], group_size: int) -> Generation:
        rows = [g * group_size + j for g in keep for j in range(group_size)]
        return Generation(**{f: ([getattr(self, f)[r] for r in rows] if f != "rewards" else self.rewards[rows])
                             for f in Generation.__slots__})

    @staticmethod
    def concat(parts: list[Generation]) -> Generation:
        return Generation(**{f: ([x for g in parts for x in getattr(g, f)] if f != "rewards"
                                 else torch.cat([g.rewards for g in parts])) for f in Generation.__slots__})


@dataclass(slots=True, kw_only=True)
class Pending:
    """The part of a generation not yet trained on: its micro-batches and the accumulation windows still to run."""

    micro_batches: list[MicroBatch]
    windows: list[int]  # index of each remaining window's first micro-batch, in order
    metrics: dict[str, float]  # the generation's metrics, logged with its next step


def pack(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Left-pad prompts and right-pad completions -> input_ids, attention_mask [M, P + T], completion_mask [M, T]."""
    width_p = max(len(p) for p in prompt_ids)
    width_c = max(1, max(len(c) for c in completion_ids))
    rows = len(prompt_ids)
    input_ids = torch.full((rows, width_p + width_c), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width_p + width_c), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        input_ids[i, width_p - len(p):width_p] = torch.tensor(p)
        input_ids[i, width_p:width_p + len(c)] = torch.tensor(c, dtype=torch.long)
        attention[i, width_p - len(p):width_p + len(c)] = 1
    return input_ids.to(device), attention.to(device), attention[:, width_p:].to(device)
