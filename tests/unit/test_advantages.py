import math
import random

import pytest
import torch

from grpokit.algo.advantages import STD_EPS, compute_advantages


def reference_advantages(rewards: list[list[float]], weights: list[float], group_size: int, scale: str) -> list[float]:
    """Plain-Python float64 reference: loops, no tensors."""
    totals = []
    for row in rewards:
        applicable = [r * w for r, w in zip(row, weights) if not math.isnan(r)]
        totals.append(sum(applicable) if applicable else math.nan)
    valid_all = [t for t in totals if not math.isnan(t)]
    if len(valid_all) > 1:
        mu = sum(valid_all) / len(valid_all)
        batch_std = math.sqrt(sum((t - mu) ** 2 for t in valid_all) / (len(valid_all) - 1))
    else:
        batch_std = 0.0
    out = []
    for g in range(0, len(totals), group_size):
        group = totals[g:g + group_size]
        valid = [t for t in group if not math.isnan(t)]
        for t in group:
            if math.isnan(t) or len(valid) < 2 or max(valid) == min(valid):
                out.append(0.0)
                continue
            mean = sum(valid) / len(valid)
            std = math.sqrt(sum((v - mean) ** 2 for v in valid) / (len(valid) - 1))
            if scale == "group":
                out.append((t - mean) / (std + STD_EPS))
            elif scale == "batch":
                out.append((t - mean) / (batch_std + STD_EPS))
            else:
                out.append(t - mean)
    return out


def reference_normalize_then_sum(rewards: list[list[float]], weights: list[float], group_size: int) -> list[float]:
    summed = [0.0] * len(rewards)
    for k, w in enumerate(weights):
        for g in range(0, len(rewards), group_size):
            values = [rewards[i][k] for i in range(g, g + group_size)]
            valid = [v for v in values if not math.isnan(v)]
            if len(valid) < 2 or max(valid) == min(valid):
                continue
            mean = sum(valid) / len(valid)
            std = math.sqrt(sum((v - mean) ** 2 for v in valid) / (len(valid) - 1))
            for i, v in zip(range(g, g + group_size), values):
                if not math.isnan(v):
                    summed[i] += w * (v - mean) / (std + STD_EPS)
    mean = sum(summed) / len(summed)
    std = math.sqrt(sum((x - mean) ** 2 for x in summed) / (len(summed) - 1)) if len(summed) > 1 else 0.0
    return [x / (std + STD_EPS) for x in summed]


def random_rewards(seed):
    rng = random.Random(seed)
    group_size = rng.randint(2, 6)
    n_groups = rng.randint(1, 5)
    k = rng.randint(1, 3)
    rewards = [[rng.choice([math.nan, rng.random(), float(rng.randint(0, 2))]) if rng.random() < 0.3
                else rng.gauss(0, 2) for _ in range(k)] for _ in range(group_size * n_groups)]
    weights = [rng.uniform(0.1, 2.0) for _ in range(k)]
    return rewards, weights, group_size


@pytest.mark.parametrize("seed", range(8))
def test_normalize_then_sum_matches_float64_reference(seed):
    rewards, weights, group_size = random_rewards(seed)
    got, _ = compute_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64),
                                group_size, aggregation="normalize_then_sum")
    want = torch.tensor(reference_normalize_then_sum(rewards, weights, group_size), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("seed", range(8))
def test_matches_float64_reference(scale, seed):
    rewards, weights, group_size = random_rewards(seed)
    expected = reference_advantages(rewards, weights, group_size, scale)
    got, _ = compute_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64),
                                group_size, scale)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_all_equal_group_is_exactly_zero():
    # 0.1 * 3 / 3 != 0.1 in floating point: the mean subtraction alone would leave noise
    rewards = torch.tensor([[0.1], [0.1], [0.1], [1.0], [0.0], [0.2]], dtype=torch.float64)
    adv, _ = compute_advantages(rewards, torch.ones(1, dtype=torch.float64), 3, "group")
    assert torch.equal(adv[:3], torch.zeros(3, dtype=torch.float64))
    assert (adv[3:] != 0).all()


def test_not_applicable_rewards_are_excluded_not_zero():
    nan = math.nan
    rewards = torch.tensor([[1.0], [nan], [0.0], [nan]], dtype=torch.float64)
    adv, totals = compute_advantages(rewards, torch.ones(1, dtype=torch.float64), 4, "none")
    # mean over the two applicable rewards is 0.5 (had None counted as 0, it would be 0.25)
    assert adv.tolist() == [0.5, 0.0, -0.5, 0.0]
    assert math.isnan(totals[1])


def test_group_with_one_applicable_reward_gives_zero():
    nan = math.nan
    rewards = torch.tensor([[1.0], [nan], [nan], [nan]], dtype=torch.float64)
    adv, _ = compute_advantages(rewards, torch.ones(1, dtype=torch.float64), 4, "group")
    assert torch.equal(adv, torch.zeros(4, dtype=torch.float64))


def test_group_advantages_sum_to_zero():
    rewards = torch.rand(24, 2, dtype=torch.float64)
    adv, _ = compute_advantages(rewards, torch.tensor([1.0, 0.5], dtype=torch.float64), 8, "group")
    torch.testing.assert_close(adv.view(3, 8).sum(1), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_batch_not_multiple_of_group_is_rejected():
    with pytest.raises(ValueError, match="groups of 4"):
        compute_advantages(torch.zeros(6, 1), torch.ones(1), 4)


def test_normalize_then_sum_hand_computed():
    # two functions, one group of 3: z-score each within the group, weight, sum, divide by the batch std
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    weights = torch.tensor([1.0, 0.5], dtype=torch.float64)
    adv, _ = compute_advantages(rewards, weights, 3, aggregation="normalize_then_sum")
    # column 1: mean 1/3, std sqrt(1/3); column 2: mean 1, std sqrt(3)
    z1 = [(1 - 1 / 3) / (math.sqrt(1 / 3) + STD_EPS), (-1 / 3) / (math.sqrt(1 / 3) + STD_EPS),
          (-1 / 3) / (math.sqrt(1 / 3) + STD_EPS)]
    z2 = [(-1) / (math.sqrt(3) + STD_EPS), (-1) / (math.sqrt(3) + STD_EPS), 2 / (math.sqrt(3) + STD_EPS)]
    summed = [a + 0.5 * b for a, b in zip(z1, z2)]
    mean = sum(summed) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in summed) / 2)
    torch.testing.assert_close(adv, torch.tensor([x / (std + STD_EPS) for x in summed], dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


def test_normalize_then_sum_keeps_silent_groups_at_zero_and_differs_from_sum_first():
    rewards = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0],    # silent group
                            [1.0, 0.0], [0.0, 10.0], [0.0, 0.0]], dtype=torch.float64)
    weights = torch.ones(2, dtype=torch.float64)
    nts, _ = compute_advantages(rewards, weights, 3, aggregation="normalize_then_sum")
    stn, _ = compute_advantages(rewards, weights, 3)
    assert torch.equal(nts[:3], torch.zeros(3, dtype=torch.float64))
    # summing first lets the 10-point reward dominate; normalising first gives both functions equal say
    assert stn[4] > 0 and stn[3] < 0
    assert not torch.allclose(nts[3:], stn[3:])


def test_gate_zeroes_the_other_rewards_where_the_gate_fails():
    from grpokit.algo.advantages import gate_rewards

    nan = math.nan
    rng = random.Random(7)
    rows = [[rng.choice([0.0, 0.5, 1.0, nan]), rng.choice([0.0, 1.0, nan]), rng.uniform(-1, 1)] for _ in range(40)]
    gated = gate_rewards(torch.tensor(rows, dtype=torch.float64), gate=0, threshold=1.0).tolist()
    for row, out in zip(rows, gated, strict=True):
        closed = not math.isnan(row[0]) and row[0] < 1.0  # a NaN gate does not apply: it gates nothing
        expected = [row[0]] + [0.0 if closed and not math.isnan(v) else v for v in row[1:]]
        assert [("nan" if math.isnan(v) else v) for v in out] == [("nan" if math.isnan(v) else v) for v in expected]


def test_gated_correctness_behind_format_changes_the_advantages():
    from grpokit.algo.advantages import gate_rewards

    # columns: format (the gate), correctness. The 2nd completion is correct but badly formatted.
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    weights = torch.tensor([0.1, 1.0], dtype=torch.float64)
    plain, _ = compute_advantages(rewards, weights, 4)
    gated, totals = compute_advantages(gate_rewards(rewards, 0, 1.0), weights, 4)
    assert totals.tolist() == [1.1, 0.0, 0.1, 0.0]
    assert plain[1] > 0 > gated[1]  # unformatted correctness no longer pays


def reference_failed_push(rewards: list[list[float]], weights: list[float], group_size: int, push: float,
                          base: list[float]) -> list[float]:
    """Plain-Python: a zero-spread group whose every applicable total is <= 0 gets -push on its applicable rows."""
    out = list(base)
    for g in range(0, len(rewards), group_size):
        totals = []
        for row in rewards[g:g + group_size]:
            applicable = [r * w for r, w in zip(row, weights) if not math.isnan(r)]
            totals.append(sum(applicable) if applicable else math.nan)
        valid = [t for t in totals if not math.isnan(t)]
        if valid and (len(valid) < 2 or max(valid) == min(valid)) and max(valid) <= 0:
            for i, t in enumerate(totals):
                if not math.isnan(t):
                    out[g + i] = -push
    return out


@pytest.mark.parametrize("aggregation", ["weighted_sum", "normalize_then_sum"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_failed_group_advantage_matches_float64_reference(aggregation, scale):
    nan = math.nan
    # groups of 4: all wrong (0); all wrong with one not applicable; all right; mixed; all negative;
    # one applicable row at 0; every row not applicable; equal positive totals
    rewards = [[0.0, 0.0]] * 4 + [[0.0, 0.0], [nan, nan], [0.0, 0.0], [0.0, nan]] + [[1.0, 0.1]] * 4 + \
        [[1.0, 0.0], [0.0, 0.0], [0.0, 0.1], [1.0, 0.1]] + [[-1.0, 0.0]] * 4 + \
        [[0.0, 0.0], [nan, nan], [nan, nan], [nan, nan]] + [[nan, nan]] * 4 + [[0.0, 0.2]] * 4
    weights = [1.0, 0.5]
    r = torch.tensor(rewards, dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64)
    base, _ = compute_advantages(r, w, 4, scale, aggregation)
    got, _ = compute_advantages(r, w, 4, scale, aggregation, failed_group_advantage=0.3)
    want = reference_failed_push(rewards, weights, 4, 0.3, base.tolist())
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=0)
    # the pushed rows, spelled out: groups 0, 1 (its applicable rows), 4 and 5 (its one row); nothing else moves
    pushed = [i for i, (a, b) in enumerate(zip(got.tolist(), base.tolist())) if a != b]
    assert pushed == [0, 1, 2, 3, 4, 6, 7, 16, 17, 18, 19, 20]
    assert all(got[i] == -0.3 for i in pushed)
