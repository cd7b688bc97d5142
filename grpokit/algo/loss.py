"""The GRPO policy loss as a pure function: log-probs + advantages -> (loss, metrics).

Per token t of completion i, with ratio r = exp(policy_logp - old_logp):
    loss_it = -min(min(r, delta) * A_i, clip(r, 1 - epsilon, 1 + epsilon_high) * A_i) * e_it + beta * kl_it
    kl_it   = exp(ref - policy) - (ref - policy) - 1          (the k3 estimator, >= 0)
`importance_sampling_level="sequence"` (GSPO) replaces r by one ratio per completion,
exp(mean_t(policy_logp - old_logp)), shared by its tokens. `delta` (two-sided clipping) caps the
unclipped ratio; None leaves it uncapped. e_it is 1, or with `top_entropy_quantile < 1` it keeps
only tokens whose entropy is in that top fraction of the micro-batch's tokens (TRL computes the
threshold over its local batch too); the KL term is not masked.

Everything that depends on loss_type is here (`LOSS_TYPES`): how `normalise` aggregates, which counts
`step_totals` gives it, and how the start-of-run summary words it. The denominators are those of the
whole optimizer step (all micro-batches), passed in as `StepTotals`, so summing micro-batch losses
gives the same loss and gradient whatever the micro-batch / accumulation split:
    grpo     sum_i mean_t(loss_it) / num_sequences
    bnpo     sum_it loss_it / num_tokens      (tokens of this process's batch)
    dapo     sum_it loss_it / num_tokens      (tokens of the global batch; equal to bnpo on one process)
    dr_grpo  sum_it loss_it / (num_sequences * max_completion_length)
No .item() here: metrics are returned as tensors and reduced by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]


@dataclass(slots=True, kw_only=True)
class LossSettings:
    loss_type: LossType = "dapo"
    importance_sampling_level: Literal["token", "sequence"] = "token"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    beta: float = 0.0
    top_entropy_quantile: float = 1.0
    max_completion_length: int = 256


@dataclass(slots=True, kw_only=True)
class StepTotals:
    """Denominators over everything that goes into one optimizer step."""

    num_sequences: int
    num_tokens: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LossTypeRule:
    """How one loss_type turns per-token losses into the step's scalar."""

    divides_by: Literal["sequences", "tokens", "constant"]  # sequence means / completion tokens / sequences x length
    process_tokens: bool = False  # the token count is this process's own (x processes), not the whole step's
    wording: str  # the summary's `loss = ...`; {seqs} {local} {length} {constant} are filled in by `describe`


LOSS_TYPES: dict[str, LossTypeRule] = {
    "grpo": LossTypeRule(divides_by="sequences", wording="the mean over each completion's tokens, then the mean "
                         "over the {seqs} completions of the step"),
    # DDP averages gradients over processes: counting this process's tokens x processes undoes that mean
    "bnpo": LossTypeRule(divides_by="tokens", process_tokens=True,
                         wording="the sum over tokens / the completion tokens in the step (this process's {local} "
                         "completions; averaged over processes)"),
    "dapo": LossTypeRule(divides_by="tokens", wording="the sum over tokens / the completion tokens in the step (all "
                         "{seqs} completions, over every process)"),
    "dr_grpo": LossTypeRule(divides_by="constant", wording="the sum over tokens / ({seqs} completions x "
                            "max_completion_length {length}) = {constant}, a constant"),
}


def rule(loss_type: str) -> LossTypeRule:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return LOSS_TYPES[loss_type]


def step_totals(loss_type: str, step_tokens: list[int], process_tokens: list[int], processes: int) -> StepTotals:
    """The counts `normalise` divides by for one optimizer step, as one process sees it: `step_tokens` are the
    loss tokens of each completion of the step (every process), `process_tokens` those of this process's part."""
    if rule(loss_type).process_tokens:
        return StepTotals(num_sequences=len(step_tokens), num_tokens=sum(process_tokens) * processes)
    return StepTotals(num_sequences=len(step_tokens), num_tokens=sum(step_tokens))


def describe(loss_type: str, *, step_sequences: int, process_sequences: int, max_completion_length: int) -> str:
    """The summary's wording of the normaliser, with the run's numbers."""
    return rule(loss_type).wording.format(seqs=step_sequences, local=process_sequences, length=max_completion_length,
                                          constant=step_sequences * max_completion_length)


def normalise(per_token: torch.Tensor, mask: torch.Tensor, settings: LossSettings, totals: StepTotals) -> torch.Tensor:
    """[B, T] values, [B, T] 0/1 mask -> this micro-batch's share of the step's scalar."""
    divides_by = rule(settings.loss_type).divides_by
    masked = per_token * mask
    if divides_by == "sequences":
        per_seq = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [B]
        return per_seq.sum() / totals.num_sequences
    if divides_by == "tokens":
        return masked.sum() / max(totals.num_tokens, 1)
    return masked.sum() / (totals.num_sequences * settings.max_completion_length)


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float) -> torch.Tensor:
    """[B, T] 0/1: tokens whose entropy is at or above the (1 - top_quantile) quantile of the real tokens."""
    real = entropy[mask.bool()]
    if top_quantile >= 1.0 or real.numel() == 0:
        return torch.ones_like(mask)
    threshold = torch.quantile(real.double(), 1.0 - top_quantile).to(entropy.dtype)
    return (entropy >= threshold).to(mask.dtype)


def grpo_loss(
    policy_logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: LossSettings,
    totals: StepTotals,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """policy/old/ref logps [B, T], advantages [B], mask [B, T], entropy [B, T] -> (scalar loss, metric tensors).

    Metrics are token means over this micro-batch: kl, clip_ratio/low_mean, clip_ratio/high_mean,
    clip_ratio/region_mean.
    """
    mask = mask.to(policy_logps.dtype)
    eps_low = settings.epsilon
    eps_high = settings.epsilon_high if settings.epsilon_high is not None else settings.epsilon
    log_ratio = policy_logps - old_logps  # [B, T]
    if settings.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1))[:, None]  # [B, 1]
    elif settings.importance_sampling_level != "token":
        raise ValueError(f"unknown importance_sampling_level {settings.importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)  # [B, T] or [B, 1]
    adv = advantages[:, None]  # [B, 1]
    capped = ratio if settings.delta is None else torch.clamp(ratio, max=settings.delta)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.minimum(capped * adv, clipped).expand_as(mask)  # [B, T]
    if settings.top_entropy_quantile < 1.0:
        if entropy is None:
            raise ValueError("top_entropy_quantile < 1 needs the token entropies")
        per_token = per_token * high_entropy_mask(entropy.detach(), mask, settings.top_entropy_quantile)

    n_tok = mask.sum().clamp(min=1)
    metrics: dict[str, torch.Tensor] = {}
    if settings.beta > 0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        delta = ref_logps - policy_logps
        kl = torch.exp(delta) - delta - 1  # [B, T]
        per_token = per_token + settings.beta * kl
        metrics["kl"] = (kl * mask).sum().detach() / n_tok

    with torch.no_grad():
        low = ((ratio < 1 - eps_low) & (adv < 0)).to(mask.dtype).expand_as(mask)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype).expand_as(mask)
        metrics["clip_ratio/low_mean"] = (low * mask).sum() / n_tok
        metrics["clip_ratio/high_mean"] = (high * mask).sum() / n_tok
        metrics["clip_ratio/region_mean"] = ((low + high) * mask).sum() / n_tok
    return normalise(per_token, mask, settings, totals), metrics
