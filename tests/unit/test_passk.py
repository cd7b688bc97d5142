"""pass@k against brute-force enumeration, maj@k on crafted answer sets, answer normalisation, the paired bootstrap."""

import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest

from grpokit.evaluation.stats import majority_at_k, normalise_answer, paired_bootstrap_ci, pass_at_k, wilson_interval


def brute_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Exact fraction of k-subsets of n samples (the first c correct) that hold a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_matches_enumeration_of_every_subset():
    rng = random.Random(0)
    cases = {(n, c, k) for n in range(1, 9) for c in range(n + 1) for k in range(1, n + 1)}
    cases |= {(n, rng.randint(0, n), rng.randint(1, n)) for n in [rng.randint(9, 14) for _ in range(40)]}
    for n, c, k in sorted(cases):
        assert pass_at_k(n, c, k) == pytest.approx(float(brute_pass_at_k(n, c, k)), rel=0, abs=1e-12), (n, c, k)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 0, 10) == 0.0  # nothing correct
    assert pass_at_k(10, 10, 1) == 1.0 and pass_at_k(10, 10, 10) == 1.0  # everything correct
    assert pass_at_k(10, 8, 3) == 1.0  # n - c = 2 < k: every 3-subset holds a correct sample
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-15)  # pass@1 is the fraction correct
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5, abs=1e-12)
    assert 0.0 < pass_at_k(10_000, 1, 1) < 1e-3  # large n: no overflow, no cancellation to 0
    for bad in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_majority_clear_winner_right_and_wrong():
    assert majority_at_k(["4", "4", "5"], [1, 1, 0], 3) == 1.0
    assert majority_at_k(["5", "4", "5"], [0, 1, 0], 3) == 0.0


def test_majority_ties_score_the_expected_random_tie_break():
    assert majority_at_k(["4", "5"], [1, 0], 2) == 0.5  # correct vs wrong
    assert majority_at_k(["4", "5", "6"], [1, 0, 0], 3) == pytest.approx(1 / 3)  # three-way
    assert majority_at_k(["4", "5", "4", "5", "6"], [1, 0, 1, 0, 0], 5) == 0.5  # 6 is not in the tie
    assert majority_at_k(["5", "6", "7", "7"], [0, 0, 0, 0], 4) == 0.0


def test_majority_skips_samples_without_answers():
    assert majority_at_k([None, None, None], [0, 0, 0], 3) == 0.0  # no votes
    assert majority_at_k([None, None, "4"], [0, 0, 1], 3) == 1.0  # one vote beats two non-votes
    assert majority_at_k([None, "5", None, "4", "4"], [0, 0, 0, 1, 1], 5) == 1.0


def test_majority_uses_the_first_k_samples():
    answers, correct = ["5", "4", "4", "4"], [0, 1, 1, 1]
    assert majority_at_k(answers, correct, 1) == 0.0
    assert majority_at_k(answers, correct, 2) == 0.5
    assert majority_at_k(answers, correct, 4) == 1.0
    with pytest.raises(ValueError):
        majority_at_k(answers, correct, 5)


def test_majority_answer_correctness_is_the_mean_over_its_samples():
    # a reward that disagrees with itself on one answer (e.g. it reads more than the answer) scores it fractionally
    assert majority_at_k(["4", "4", "5"], [1, 0, 0], 3) == 0.5


def test_normalise_answer_merges_number_spellings():
    assert normalise_answer("1,234.00") == normalise_answer("1234") == normalise_answer("$1234.") == "1234"
    assert normalise_answer("0.5") == normalise_answer("1/2") == normalise_answer(" 1 / 2 ")
    assert normalise_answer("-3") == "-3" and normalise_answer("45%") == "45"
    assert normalise_answer("x + 1") == normalise_answer("x+1")
    assert normalise_answer(None) is None and normalise_answer("  ") is None
    assert normalise_answer("3/0") == "3/0"


def test_paired_bootstrap_interval():
    a = np.random.default_rng(1).random(50)
    assert paired_bootstrap_ci(a, a) == (0.0, 0.0)  # identical: no difference in any resample
    low, high = paired_bootstrap_ci(a, a + 0.25)  # a constant shift survives every paired resample
    assert low == pytest.approx(0.25) and high == pytest.approx(0.25)
    b = a + np.random.default_rng(2).normal(0.1, 0.05, 50)
    low, high = paired_bootstrap_ci(a, b, seed=3)
    assert low < float(np.mean(b - a)) < high and 0.07 < low and high < 0.14
    assert paired_bootstrap_ci(a, b, seed=3) == (low, high)  # fixed seed: reproducible


def test_paired_bootstrap_matches_a_plain_loop():
    a, b = [1.0, 0.0, 1.0, math.nan, 0.0, 1.0], [1.0, 1.0, 1.0, math.nan, 0.0, 0.0]
    rng = np.random.default_rng(7)
    idx = rng.integers(0, len(a), size=(10, len(a)))  # the function's draws: one chunk of 10 resamples
    diffs = []
    for row in idx:
        a_kept = [a[i] for i in row if not math.isnan(a[i])]
        b_kept = [b[i] for i in row if not math.isnan(b[i])]
        if a_kept and b_kept:
            diffs.append(sum(b_kept) / len(b_kept) - sum(a_kept) / len(a_kept))
    expected = tuple(np.percentile(diffs, [2.5, 97.5]))
    assert paired_bootstrap_ci(a, b, resamples=10, seed=7) == pytest.approx(expected, abs=1e-12)


# -- Wilson score interval -------------------------------------------------------------------------
@pytest.mark.parametrize(("successes", "trials", "low", "high"), [
    (5, 10, 0.2366, 0.7634),  # textbook values (Newcombe 1998, 95%)
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
])
def test_wilson_interval_matches_published_values(successes, trials, low, high):
    got = wilson_interval(successes, trials)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_wilson_interval_against_the_score_test_it_inverts():
    """Every p inside the interval passes the score test |p_hat - p| <= z * sqrt(p (1 - p) / n); just outside fails."""
    z, n, x = 1.959963984540054, 200, 33
    low, high = wilson_interval(x, n)
    inside = lambda p: abs(x / n - p) <= z * math.sqrt(p * (1 - p) / n)  # noqa: E731
    assert inside(low + 1e-9) and inside(high - 1e-9) and not inside(low - 1e-6) and not inside(high + 1e-6)


def test_wilson_interval_rejects_impossible_counts():
    with pytest.raises(ValueError, match="0 <= successes <= trials"):
        wilson_interval(3, 2)
