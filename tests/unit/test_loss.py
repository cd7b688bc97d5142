import math
import random

import pytest
import torch

from grpokit.algo.loss import LossSettings, StepTotals, grpo_loss


def reference_loss(policy, old, ref, adv, mask, s: LossSettings, entropy=None) -> float:
    """Plain float64 loops over sequences and tokens."""
    eps_high = s.epsilon_high if s.epsilon_high is not None else s.epsilon
    keep = None
    if s.top_entropy_quantile < 1.0:
        real = sorted(entropy[i][t] for i in range(len(mask)) for t in range(len(mask[i])) if mask[i][t])
        pos = (1 - s.top_entropy_quantile) * (len(real) - 1)  # linear interpolation, as numpy/torch quantile
        lo = math.floor(pos)
        threshold = real[lo] + (real[min(lo + 1, len(real) - 1)] - real[lo]) * (pos - lo)
        keep = [[entropy[i][t] >= threshold for t in range(len(mask[i]))] for i in range(len(mask))]
    per_seq_sums, per_seq_means, n_tokens = [], [], 0
    for i in range(len(policy)):
        real_t = [t for t in range(len(policy[i])) if mask[i][t]]
        if s.importance_sampling_level == "sequence":
            seq_log_ratio = sum(policy[i][t] - old[i][t] for t in real_t) / max(len(real_t), 1)
        seq_sum, seq_len = 0.0, 0
        for t in real_t:
            if s.importance_sampling_level == "sequence":
                ratio = math.exp(seq_log_ratio)
            else:
                ratio = math.exp(policy[i][t] - old[i][t])
            capped = ratio if s.delta is None else min(ratio, s.delta)
            clipped = min(max(ratio, 1 - s.epsilon), 1 + eps_high)
            value = -min(capped * adv[i], clipped * adv[i])
            if keep is not None and not keep[i][t]:
                value = 0.0
            if s.beta > 0:
                d = ref[i][t] - policy[i][t]
                value += s.beta * (math.exp(d) - d - 1)
            seq_sum += value
            seq_len += 1
        per_seq_sums.append(seq_sum)
        per_seq_means.append(seq_sum / max(seq_len, 1))
        n_tokens += seq_len
    if s.loss_type == "grpo":
        return sum(per_seq_means) / len(policy)
    if s.loss_type in ("bnpo", "dapo"):
        return sum(per_seq_sums) / n_tokens
    return sum(per_seq_sums) / (len(policy) * s.max_completion_length)


def random_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    b, t = rng.randint(1, 6), rng.randint(1, 9)
    policy = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = policy + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3  # ratios on both sides of the clip
    ref = policy + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).double()
    return policy, old, ref, adv, mask


def _check(s: LossSettings, seed: int, with_entropy: bool = False):
    policy, old, ref, adv, mask = random_case(seed)
    entropy = torch.rand(policy.shape, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    totals = StepTotals(num_sequences=policy.shape[0], num_tokens=int(mask.sum()))
    got, metrics = grpo_loss(policy, old, ref if s.beta else None, adv, mask, s, totals,
                             entropy=entropy if with_entropy else None)
    want = reference_loss(policy.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), s,
                          entropy.tolist() if with_entropy else None)
    assert abs(got.item() - want) <= 1e-6 * max(abs(want), 1e-12), (got.item(), want)
    assert ("kl" in metrics) == (s.beta > 0)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
@pytest.mark.parametrize("seed", range(4))
def test_matches_float64_reference(loss_type, level, beta, epsilon_high, seed):
    _check(LossSettings(loss_type=loss_type, importance_sampling_level=level, epsilon=0.2, epsilon_high=epsilon_high,
                        beta=beta, max_completion_length=12), seed)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("seed", range(4))
def test_two_sided_clip_delta_matches_reference(level, seed):
    _check(LossSettings(loss_type="grpo", importance_sampling_level=level, delta=1.05, beta=0.02), seed)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("seed", range(4))
def test_top_entropy_quantile_matches_reference(loss_type, seed):
    _check(LossSettings(loss_type=loss_type, top_entropy_quantile=0.3, beta=0.05), seed, with_entropy=True)


def test_delta_caps_the_gain_from_a_large_ratio():
    policy = torch.log(torch.tensor([[3.0]], dtype=torch.float64))
    old = torch.zeros(1, 1, dtype=torch.float64)
    adv = torch.tensor([-1.0], dtype=torch.float64)  # negative advantage: the unclipped term is the min
    totals = StepTotals(num_sequences=1, num_tokens=1)
    free, _ = grpo_loss(policy, old, None, adv, torch.ones(1, 1), LossSettings(), totals)
    capped, _ = grpo_loss(policy, old, None, adv, torch.ones(1, 1), LossSettings(delta=1.5), totals)
    assert free.item() == pytest.approx(3.0) and capped.item() == pytest.approx(1.5)


def test_masked_tokens_get_zero_gradient():
    policy, old, ref, adv, mask = random_case(3)
    mask[:, -1] = 0
    for level in ("token", "sequence"):
        p = policy.clone().requires_grad_(True)
        loss, _ = grpo_loss(p, old, ref, adv, mask, LossSettings(importance_sampling_level=level, beta=0.1),
                            StepTotals(num_sequences=p.shape[0], num_tokens=int(mask.sum())))
        loss.backward()
        assert torch.equal(p.grad[mask == 0], torch.zeros_like(p.grad[mask == 0]))
        assert (p.grad[mask == 1] != 0).any()


def test_first_pass_ratio_is_one_and_nothing_is_clipped():
    policy, _, _, adv, mask = random_case(5)
    for level in ("token", "sequence"):
        _, m = grpo_loss(policy, policy.detach(), None, adv, mask, LossSettings(importance_sampling_level=level),
                         StepTotals(num_sequences=policy.shape[0], num_tokens=int(mask.sum())))
        assert m["clip_ratio/region_mean"].item() == 0.0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_micro_batch_split_gives_same_loss_and_gradient(loss_type, level):
    """Summing micro-batch losses under the step's totals equals the whole-batch loss (1 x 8 == 8 x 1)."""
    policy, old, ref, adv, mask = random_case(11)
    policy = torch.cat([policy] * 4)
    old, ref, adv, mask = (torch.cat([x] * 4) for x in (old, ref, adv, mask))
    s = LossSettings(loss_type=loss_type, importance_sampling_level=level, beta=0.04, max_completion_length=12)
    totals = StepTotals(num_sequences=policy.shape[0], num_tokens=int(mask.sum()))

    whole = policy.clone().requires_grad_(True)
    loss_whole, _ = grpo_loss(whole, old, ref, adv, mask, s, totals)
    loss_whole.backward()

    split = policy.clone().requires_grad_(True)
    parts = [grpo_loss(split[i:i + 1], old[i:i + 1], ref[i:i + 1], adv[i:i + 1], mask[i:i + 1], s, totals)[0]
             for i in range(policy.shape[0])]
    loss_split = sum(parts)
    loss_split.backward()
    torch.testing.assert_close(loss_split, loss_whole, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(split.grad, whole.grad, rtol=1e-12, atol=1e-15)


def test_gradient_pushes_toward_positive_advantage():
    policy = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    loss, _ = grpo_loss(policy, policy.detach(), None, torch.tensor([1.0, -1.0], dtype=torch.float64),
                        torch.ones(2, 3, dtype=torch.float64), LossSettings(),
                        StepTotals(num_sequences=2, num_tokens=6))
    loss.backward()
    assert (policy.grad[0] < 0).all() and (policy.grad[1] > 0).all()  # descent raises logp of the good one


def test_clip_ratio_metrics_count_clipped_tokens():
    policy = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.0]], dtype=torch.float64))
    old = torch.zeros(2, 2, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    _, m = grpo_loss(policy, old, None, adv, torch.ones(2, 2, dtype=torch.float64), LossSettings(epsilon=0.2),
                     StepTotals(num_sequences=2, num_tokens=4))
    assert m["clip_ratio/high_mean"].item() == 0.25  # ratio 1.5 > 1.2 with A > 0
    assert m["clip_ratio/low_mean"].item() == 0.25  # ratio 0.5 < 0.8 with A < 0
    assert m["clip_ratio/region_mean"].item() == 0.5


def test_kl_is_zero_at_reference_and_positive_elsewhere():
    policy = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    s = LossSettings(beta=0.1)
    totals = StepTotals(num_sequences=1, num_tokens=2)
    _, at_ref = grpo_loss(policy, policy, policy, torch.zeros(1, dtype=torch.float64), torch.ones(1, 2), s, totals)
    _, away = grpo_loss(policy, policy, policy - 0.5, torch.zeros(1, dtype=torch.float64), torch.ones(1, 2), s, totals)
    assert at_ref["kl"].item() == 0.0
    assert away["kl"].item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)
