"""The data one generation becomes: scored completions, the plan of its micro-batches, packed micro-batches,
and what is left of them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpokit.algo.loss import StepTotals, step_totals


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
    sampler_entropy: torch.Tensor | None = None  # [M, T] each token's entropy under the sampler, when it gave them

    def rows(self, index: torch.Tensor) -> MicroBatch:
        """The micro-batch of the rows `index` (the step's counts kept: the loss is normalised as before)."""
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        return MicroBatch(input_ids=self.input_ids[index], attention_mask=self.attention_mask[index],
                          completion_mask=self.completion_mask[index], advantages=self.advantages[index],
                          old_logps=pick(self.old_logps), ref_logps=pick(self.ref_logps),
                          step_sequences=self.step_sequences, step_tokens=self.step_tokens,
                          sampler_entropy=pick(self.sampler_entropy))


@dataclass(slots=True, kw_only=True)
class Generation:
    """Scored completions of whole groups, prompt-major: rows i*G .. i*G+G-1 share a prompt."""

    prompts: list  # [N], the dataset's prompt (text or chat messages) of each completion
    completions: list  # [N], decoded as the rewards saw them
    prompt_ids: list[list[int]]  # [N], one per completion
    completion_ids: list[list[int]]  # [N]
    finish_reasons: list[str]  # [N]
    rewards: torch.Tensor  # [N, K], NaN = not applicable
    sampler_entropies: list[list[float] | None]  # [N], each token's entropy under the sampler (None: not given)

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


@dataclass(slots=True, kw_only=True)
class PlannedMicroBatch:
    """Which rows of a generation one micro-batch trains on, and its optimizer step's loss normaliser counts."""

    rows: slice
    totals: StepTotals  # shared by every micro-batch of the same window


def plan_micro_batches(completion_lengths: list[int], finish_reasons: list[str], *, batch_size: int,
                       accumulation: int, loss_type: str, mask_truncated: bool, process_index: int = 0,
                       process_count: int = 1) -> list[PlannedMicroBatch]:
    """This process's micro-batches of a generation, window by window (a window is one optimizer step).

    A window is `batch_size x accumulation x process_count` consecutive rows; process r trains on the r-th part of
    each window, `accumulation` micro-batches of `batch_size` rows. A row counts its completion's tokens in the
    loss, or none when `mask_truncated` and it did not finish by "stop"."""
    counted = [n if f == "stop" or not mask_truncated else 0
               for n, f in zip(completion_lengths, finish_reasons, strict=True)]  # tokens in the loss
    local = batch_size * accumulation
    window = local * process_count
    planned = []
    for window_start in range(0, len(counted), window):
        part = window_start + process_index * local
        totals = step_totals(loss_type, counted[window_start:window_start + window], counted[part:part + local],
                             process_count)
        planned.extend(PlannedMicroBatch(rows=slice(start, start + batch_size), totals=totals)
                       for start in range(part, part + local, batch_size))
    return planned


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


def make_micro_batch(batch: Generation, advantages: torch.Tensor, planned: PlannedMicroBatch, *, pad_id: int,
                     device, dtype: torch.dtype, mask_truncated: bool) -> MicroBatch:
    """The planned rows of `batch`, packed on `device`, with their advantages in `dtype` (the loss's)."""
    sl = planned.rows
    input_ids, attention, cmask = pack(batch.prompt_ids[sl], batch.completion_ids[sl], pad_id, device)
    if mask_truncated:
        finished = torch.tensor([f == "stop" for f in batch.finish_reasons[sl]], device=device)
        cmask = cmask * finished[:, None]
    entropies = batch.sampler_entropies[sl]
    sampler_entropy = None
    if all(e is not None for e in entropies):  # [M, T] like the completion mask, 0 past each completion
        sampler_entropy = torch.zeros(cmask.shape, dtype=dtype)
        for i, e in enumerate(entropies):
            sampler_entropy[i, :len(e)] = torch.tensor(e, dtype=dtype)
        sampler_entropy = sampler_entropy.to(device)
    return MicroBatch(input_ids=input_ids, attention_mask=attention, completion_mask=cmask,
                      advantages=advantages[sl].to(device, dtype), step_sequences=planned.totals.num_sequences,
                      step_tokens=planned.totals.num_tokens, sampler_entropy=sampler_entropy)
