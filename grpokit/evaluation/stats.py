"""Sampled-evaluation statistics: pass@k, maj@k, and a paired bootstrap for comparing two models.

Pure functions of per-sample outcomes; `evaluate.py` feeds them, the CLI's `eval --compare` uses
the bootstrap.

- pass@k is Chen et al. (2021)'s unbiased estimator from n >= k samples with c correct:
  1 - C(n-c, k) / C(n, k), computed as the product 1 - prod_{i=n-c+1..n} (1 - k/i), which never
  forms a large binomial coefficient. A sample is correct when its accuracy reward is >= 1 (full
  credit; partial credit does not count).
- maj@k votes over the answers the first k samples commit to (`completion_answer`, then
  `normalise_answer`). Departures and choices the paper leaves open:
  - answers are grouped by normalised text, not by math-verify equivalence (`\\frac{1}{2}` and
    `1/2` are two answers; `0.5`, `1/2` and `1,234.00`/`1234` are merged by the number rule);
    pairwise verification would cost O(k^2) verifier calls per prompt;
  - a sample without an extractable answer does not vote; no votes at all scores 0;
  - a tie scores the expected correctness under a uniformly random tie-break: the mean over the
    tied answers, each answer's correctness being the mean correctness of the samples that gave it
    (a correct-vs-wrong tie scores 1/2).
- The paired bootstrap resamples prompts (the same resample for both models) and reports the
  percentile interval of mean(B) - mean(A).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence
from fractions import Fraction

import numpy as np

_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+|\d+/\d+)")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def normalise_answer(answer: str | None) -> str | None:
    """A voting key for an extracted answer: numbers in canonical form (`1,234.00` -> `1234`, `0.5` -> `1/2`),
    anything else with `$`, spaces and a trailing period removed. None stays None (no vote)."""
    if answer is None:
        return None
    text = answer.strip().rstrip(".").replace("\\$", "").replace("$", "").replace("\\%", "").rstrip("%")
    text = "".join(text.split())
    numeric = text.replace(",", "")
    if _NUMBER.fullmatch(numeric):
        try:
            value = Fraction(numeric)
        except ZeroDivisionError:  # '3/0' is an answer a model can write; it votes as written
            return text
        return str(value)
    return text or None


def majority_at_k(answers: Sequence[Hashable | None], correct: Sequence[float], k: int) -> float:
    """maj@k of one prompt from its samples' voting keys (None: no answer) and correctness (0..1), first k only.

    The score is the correctness of the most frequent answer; a tie scores the mean over the tied
    answers (uniformly random tie-break); each answer's correctness is the mean over the samples that
    gave it. No votes among the first k scores 0.
    """
    if len(answers) != len(correct):
        raise ValueError(f"majority_at_k: {len(answers)} answers but {len(correct)} correctness values")
    if not 1 <= k <= len(answers):
        raise ValueError(f"majority_at_k needs 1 <= k <= {len(answers)} samples, got k={k}")
    votes: Counter = Counter()
    scores: dict[Hashable, list[float]] = {}
    for answer, value in zip(answers[:k], correct[:k], strict=True):
        if answer is None:
            continue
        votes[answer] += 1
        scores.setdefault(answer, []).append(float(value))
    if not votes:
        return 0.0
    top = max(votes.values())
    tied = [a for a, count in votes.items() if count == top]
    return sum(sum(scores[a]) / len(scores[a]) for a in tied) / len(tied)


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default): unlike p +- z*se it stays inside [0, 1]
    and is not empty at 0 or n successes."""
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"wilson_interval: need 0 <= successes <= trials and trials > 0, got {successes}/{trials}")
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], resamples: int = 10_000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of nanmean(b) - nanmean(a) over `resamples` resamples of the prompts (pairs kept).

    NaN marks a prompt where a metric does not apply; it is left out of that model's mean in each
    resample. A resample where one side has no values is dropped.
    """
    a_values, b_values = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)  # [P], [P]
    if a_values.shape != b_values.shape or a_values.ndim != 1 or not len(a_values):
        raise ValueError(f"paired_bootstrap_ci needs two equal-length non-empty lists, got shapes {a_values.shape} "
                         f"and {b_values.shape}")
    rng = np.random.default_rng(seed)
    differences = []
    for start in range(0, resamples, 1000):  # chunks bound the [R, P] index matrix
        idx = rng.integers(0, len(a_values), size=(min(1000, resamples - start), len(a_values)))  # [R, P]
        differences.append(_nanmean_rows(b_values[idx]) - _nanmean_rows(a_values[idx]))
    diffs = np.concatenate(differences)
    diffs = diffs[~np.isnan(diffs)]
    if not len(diffs):
        return math.nan, math.nan
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return float(low), float(high)


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    valid = ~np.isnan(values)
    counts = valid.sum(axis=1)
    sums = np.where(valid, values, 0.0).sum(axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
