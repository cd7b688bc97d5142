"""Rewards -> advantages, as pure functions of tensors.

Per completion, the K reward columns are combined as a weighted sum; NaN marks "not applicable"
and is left out of the sum, and a completion with no applicable reward at all has NaN total.
Group statistics ignore NaN totals. The advantage is (r - group mean), divided by the group
std (`scale_rewards="group"`, unbiased std as in TRL), by the std of the whole batch ("batch"),
or not divided ("none"); 1e-4 is added to the std as in TRL.

`aggregation="normalize_then_sum"` (GDPO, as TRL): each reward function is z-scored within its
group first (NaN-aware), the weighted z-scores are summed, and the sums are divided by their
batch std. TRL also subtracts the batch mean of the sums; that mean is zero by construction
(every group's z-scores sum to zero), so it is not subtracted here, which keeps silent groups at
exactly 0 instead of floating-point residue.

Gating (`gate_rewards`, for `reward_combination="gated"`): every reward other than the gate
counts as 0 where the gate's reward is below its threshold, e.g. correctness only behind the
asked-for format. A gate that is not applicable (NaN) gates nothing; a gated reward that is
not applicable stays NaN.

Failed groups (`failed_group_advantage` x > 0, off by default): a zero-spread group whose every applicable
total is <= 0 (every answer wrong, nothing to compare) gets advantage -x on each applicable completion
instead of 0, so the policy is pushed off an answer it gives with confidence and is always wrong about
(negative-sample reinforcement). Group mean subtraction alone gives such a group no signal at all.

Departures: a group with zero spread (all totals equal, or fewer than two applicable) gets an
advantage of exactly 0 rather than (r - mean) rounding noise, and a completion whose total is NaN
gets 0, so neither pushes the policy.
"""

from __future__ import annotations

from typing import Literal

import torch

STD_EPS = 1e-4


def combine_rewards(rewards: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[N, K] rewards (NaN = not applicable), [K] weights -> [N] totals, NaN where no reward applies."""
    applicable = ~torch.isnan(rewards)  # [N, K]
    total = torch.where(applicable, rewards * weights, torch.zeros_like(rewards)).sum(dim=1)  # [N]
    return torch.where(applicable.any(dim=1), total, torch.full_like(total, float("nan")))


def gate_rewards(rewards: torch.Tensor, gate: int, threshold: float) -> torch.Tensor:
    """[N, K] rewards -> [N, K] with every column but `gate` zeroed where rewards[:, gate] < threshold."""
    closed = rewards[:, gate] < threshold  # [N]; NaN compares False: an inapplicable gate stays open
    others = torch.ones(rewards.shape[1], dtype=torch.bool)
    others[gate] = False
    shut = closed[:, None] & others[None, :] & ~torch.isnan(rewards)  # [N, K]
    return torch.where(shut, torch.zeros_like(rewards), rewards)


def group_stats(totals: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NaN-aware per-group (mean, unbiased std, zero_spread), each [N // group_size]."""
    grouped = totals.view(-1, group_size)  # [B, G]
    valid = ~torch.isnan(grouped)
    count = valid.sum(dim=1)  # [B]
    filled = torch.where(valid, grouped, torch.zeros_like(grouped))
    mean = filled.sum(dim=1) / count.clamp(min=1)
    sq = torch.where(valid, (grouped - mean[:, None]) ** 2, torch.zeros_like(grouped)).sum(dim=1)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    hi = torch.where(valid, grouped, torch.full_like(grouped, -torch.inf)).amax(dim=1)
    lo = torch.where(valid, grouped, torch.full_like(grouped, torch.inf)).amin(dim=1)
    zero_spread = (count < 2) | (hi == lo)
    return mean, std, zero_spread


def compute_advantages(
    rewards: torch.Tensor,
    weights: torch.Tensor,
    group_size: int,
    scale_rewards: Literal["group", "batch", "none"] = "group",
    aggregation: Literal["weighted_sum", "normalize_then_sum"] = "weighted_sum",
    failed_group_advantage: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] rewards -> ([N] advantages, [N] combined totals). N must be a multiple of group_size."""
    if rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} completions do not split into groups of {group_size}")
    totals = combine_rewards(rewards, weights)  # [N]
    if aggregation == "normalize_then_sum":
        advantages = _normalize_then_sum(rewards, weights, group_size)
        return _push_failed(advantages, totals, group_size, failed_group_advantage), totals
    if aggregation != "weighted_sum":
        raise ValueError(f"aggregation must be 'weighted_sum' or 'normalize_then_sum', got {aggregation!r}")
    mean, std, zero_spread = group_stats(totals, group_size)  # [B] each
    centred = totals - mean.repeat_interleave(group_size)  # [N]
    if scale_rewards == "group":
        advantages = centred / (std.repeat_interleave(group_size) + STD_EPS)
    elif scale_rewards == "batch":
        valid = totals[~torch.isnan(totals)]
        batch_std = valid.std() if valid.numel() > 1 else torch.zeros((), dtype=totals.dtype)
        advantages = centred / (batch_std + STD_EPS)
    elif scale_rewards == "none":
        advantages = centred
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    silent = zero_spread.repeat_interleave(group_size) | torch.isnan(totals)
    advantages = torch.where(silent, torch.zeros_like(advantages), advantages)
    return _push_failed(advantages, totals, group_size, failed_group_advantage), totals


def _push_failed(advantages: torch.Tensor, totals: torch.Tensor, group_size: int, push: float) -> torch.Tensor:
    """-push on the applicable completions of zero-spread groups whose every applicable total is <= 0."""
    if push == 0.0:
        return advantages
    _, _, zero_spread = group_stats(totals, group_size)
    grouped = totals.view(-1, group_size)
    valid = ~torch.isnan(grouped)
    failed = zero_spread & valid.any(dim=1) & torch.where(valid, grouped <= 0, torch.ones_like(valid)).all(dim=1)
    hit = failed.repeat_interleave(group_size) & ~torch.isnan(totals)
    return torch.where(hit, torch.full_like(advantages, -push), advantages)


def _normalize_then_sum(rewards: torch.Tensor, weights: torch.Tensor, group_size: int) -> torch.Tensor:
    columns = []
    for k in range(rewards.shape[1]):
        column = rewards[:, k]  # [N]
        mean, std, zero_spread = group_stats(column, group_size)
        z = (column - mean.repeat_interleave(group_size)) / (std.repeat_interleave(group_size) + STD_EPS)
        silent = zero_spread.repeat_interleave(group_size) | torch.isnan(column)
        columns.append(torch.where(silent, torch.zeros_like(z), z) * weights[k])
    summed = torch.stack(columns, dim=1).sum(dim=1)  # [N]; group sums are zero by construction
    scale = summed.std() if summed.numel() > 1 else torch.zeros((), dtype=summed.dtype)
    return summed / (scale + STD_EPS)
