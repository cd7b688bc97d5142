"""Training-health alerts: known GRPO failure modes spotted in the per-step metrics.

`HealthMonitor.observe(step, metrics)` takes the dict the trainer logs each optimizer step (TRL's
metric names) and returns the alerts that *start* at that step. Each `Alert` says what was seen,
with the numbers, its likely causes, and a fix. The monitor is pure: it neither logs nor prints,
and it never raises on odd metric values; the trainer prints each returned alert once and writes
it to the log, so an alert shows up wherever the run's other messages do.

The checks, over a rolling window of the last `window` steps (a mean, so one noisy step neither
fires nor clears an alert):

- zero_reward_spread: `frac_reward_zero_std` high; most groups give no learning signal.
- truncated_completions: `completions/clipped_ratio` high; completions hit max_completion_length.
- entropy_collapse: `entropy` far below its early-run level and below an absolute floor.
- kl_blowup: `kl` above a floor and growing fast, or above an absolute ceiling.
- length_hacking: `completions/mean_length` and `reward` rising while the correctness reward
  (`rewards/{correctness_reward}/mean`) does not.
- identical_completions: `completions/frac_identical_in_group` high (see `identical_fraction`).

"Early-run" levels are the median of the first `window` finite values the monitor sees of a metric
(the median, so one outlier step does not move the baseline). Checkpoints keep the monitor's state
(`state` / `restore`: windows, baselines, which alerts are active), so a resumed run measures against
the first steps of the run and alerts at the steps the uninterrupted run would.

Firing and hysteresis: an alert fires at the first step its condition holds. It can fire again
only after its condition has been checked and found false on `rearm_steps` consecutive steps
(default: `window`), so a metric hovering at a threshold gives one alert, not one every few steps,
while a problem that really goes away and comes back is reported again.

Missing data: a metric that is absent, None or non-finite at a step is skipped (its window spans
the steps where it was present), and a check whose metrics are not all present and finite at a step
is not evaluated at that step: it neither fires nor counts towards re-arming. So `kl` with beta = 0
is simply never checked, and a non-finite step (which the trainer reports itself) changes nothing.
A check also waits until it has a full window (two for the growth test of kl_blowup).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(slots=True, kw_only=True)
class Alert:
    name: str  # stable id, e.g. "zero_reward_spread"
    step: int  # the optimizer step at which the condition started
    message: str  # what was seen, with the numbers
    causes: str  # likely causes
    fix: str  # what to do

    def __str__(self) -> str:
        return (f"[health] step {self.step}: {self.name}\n"
                f"  seen:   {self.message}\n"
                f"  causes: {self.causes}\n"
                f"  fix:    {self.fix}")


def identical_fraction(completion_ids: list[list[int]], group_size: int) -> float:
    """Mean over groups of the fraction of a group's completions that equal another one in the group.

    Rows are prompt-major (rows i*G .. i*G+G-1 are group i). A group [a, a, b, c] scores 2/4, [a, a, a, a]
    scores 1, all distinct scores 0. No completions at all gives 0.
    """
    if group_size < 1:
        raise ValueError(f"identical_fraction: group_size must be >= 1, got {group_size}")
    if len(completion_ids) % group_size:
        raise ValueError(f"identical_fraction: {len(completion_ids)} completions do not split into groups of "
                         f"{group_size}")
    n_groups = len(completion_ids) // group_size
    if n_groups == 0:
        return 0.0
    total = 0.0
    for g in range(n_groups):
        counts = Counter(tuple(ids) for ids in completion_ids[g * group_size:(g + 1) * group_size])
        total += sum(c for c in counts.values() if c > 1) / group_size
    return total / n_groups


@dataclass(slots=True, kw_only=True)
class _Check:
    name: str
    keys: tuple[str, ...]  # metrics that must all be present and finite for the check to run at a step
    test: Callable[[], tuple[bool, str] | None]  # (holds, message), or None while there is too little data
    causes: str
    fix: str
    active: bool = False  # fired and not yet re-armed
    false_streak: int = 0  # consecutive checked steps where the condition was false


class HealthMonitor:
    """Watches the per-step metrics for known GRPO failure modes; see the module docstring.

    Thresholds (defaults chosen to be quiet on healthy runs and loud on the broken ones):

    - `window` = 10 steps: long enough to average out batch noise (a step sees only B prompts),
      short enough to report a problem within a few percent of a typical few-hundred-step run.
    - `rearm_steps` (default `window`): steps the condition must stay false before it can fire again.
    - `zero_spread` = 0.9: mean `frac_reward_zero_std`. At 0.9 only one group in ten carries any
      advantage, so the effective batch is a tenth of the one configured; healthy runs on a
      well-matched dataset sit around 0.2-0.6.
    - `clipped` = 0.5: mean `completions/clipped_ratio`. When half the completions are cut off, most
      rewards score unfinished answers and the loss trains on text with no ending.
    - `entropy_ratio` = 0.3 and `entropy_floor` = 0.1 nats/token: mean `entropy` below 0.3x its early
      median *and* below 0.1. Entropy normally drifts down during RL; a fall to under a third that
      also ends near zero is the collapse DAPO describes (the policy samples one answer), while the
      floor keeps a model that started at high entropy from alerting on an ordinary decline.
    - `kl_floor` = 0.1, `kl_growth` = 3.0, `kl_max` = 1.0 (nats/token, TRL's k3 estimate): mean `kl`
      above 0.1 that tripled against the window before it, or above 1.0 at all. Healthy runs stay
      around 0.001-0.1 and grow slowly; below the floor the policy is still close to its reference,
      so a fast relative rise from ~0 at the start is not an alert.
    - `length_growth` = 0.5, `reward_rise` = 0.1, `correctness_delta` = 0.05: mean
      `completions/mean_length` at least 1.5x its early median, `reward` up by at least 0.1 on its
      early median, while `rewards/{correctness_reward}/mean` rose by no more than 0.05 (flat or
      falling). The reward deltas are in the rewards' own units, for rewards in the usual 0-1 range
      per function; scale them with your rewards. Needs `correctness_reward`: pass None when the
      correctness reward is the only one (then the total reward *is* correctness, up to its weight,
      and the check says nothing useful).
    - `identical` = 0.5: mean `completions/frac_identical_in_group`. When half of each group are
      copies, the group's spread and the exploration behind it are gone.
    """

    def __init__(self, correctness_reward: str | None = None, window: int = 10, *, rearm_steps: int | None = None,
                 zero_spread: float = 0.9, clipped: float = 0.5, entropy_ratio: float = 0.3, entropy_floor: float = 0.1,
                 kl_floor: float = 0.1, kl_growth: float = 3.0, kl_max: float = 1.0, length_growth: float = 0.5,
                 reward_rise: float = 0.1, correctness_delta: float = 0.05, identical: float = 0.5):
        if window < 1:
            raise ValueError(f"HealthMonitor: window must be >= 1 step, got {window}")
        if rearm_steps is not None and rearm_steps < 1:
            raise ValueError(f"HealthMonitor: rearm_steps must be >= 1 step, got {rearm_steps}")
        self.window = window
        self.rearm_steps = window if rearm_steps is None else rearm_steps
        self.zero_spread, self.clipped, self.identical = zero_spread, clipped, identical
        self.entropy_ratio, self.entropy_floor = entropy_ratio, entropy_floor
        self.kl_floor, self.kl_growth, self.kl_max = kl_floor, kl_growth, kl_max
        self.length_growth, self.reward_rise, self.correctness_delta = length_growth, reward_rise, correctness_delta
        self.correctness_key = None if correctness_reward is None else f"rewards/{correctness_reward}/mean"
        self._recent: dict[str, deque[float]] = {}  # the last 2 * window finite values of each metric
        self._early: dict[str, list[float]] = {}  # the first `window` finite values of each metric
        self._checks = [
            _Check(name="zero_reward_spread", keys=("frac_reward_zero_std",), test=self._zero_spread,
                   causes="the tasks are too hard (every completion fails) or too easy (every one passes) for this "
                          "model; a reward that is nearly constant; num_generations too small to see a difference",
                   fix="filter the prompts by the model's pass rate (keep those it solves sometimes, not never or "
                       "always); raise num_generations or temperature; check the reward on a few completions by hand"),
            _Check(name="truncated_completions", keys=("completions/clipped_ratio",), test=self._truncation,
                   causes="max_completion_length too small for the task; the model rambles or repeats; no stop token "
                          "or stop string ends the answer",
                   fix="raise max_completion_length; add stop_strings; add a length penalty or "
                       "soft_overlong_punishment; set mask_truncated_completions: true"),
            _Check(name="entropy_collapse", keys=("entropy",), test=self._entropy_collapse,
                   causes="learning_rate too high; reward hacking (the policy found one answer the reward likes); a "
                          "format reward strong enough to dominate",
                   fix="lower learning_rate; set beta > 0 to hold the policy near its reference; lower the format "
                       "rewards' weights; raise temperature"),
            _Check(name="kl_blowup", keys=("kl",), test=self._kl_blowup,
                   causes="learning_rate too high; beta too small to hold the policy; large updates from a few "
                          "high-advantage batches",
                   fix="lower learning_rate; raise beta; lower max_grad_norm; "
                       "resume from a checkpoint before the rise"),
            _Check(name="identical_completions", keys=("completions/frac_identical_in_group",), test=self._identical,
                   causes="temperature or top_p too low; the policy has collapsed onto one answer per prompt",
                   fix="raise temperature or top_p; check the entropy metric; lower learning_rate if entropy fell"),
        ]
        if self.correctness_key is not None:
            self._checks.append(
                _Check(name="length_hacking", keys=("completions/mean_length", "reward", self.correctness_key),
                       test=self._length_hacking,
                       causes="a reward term that grows with length (reasoning-step counts, format rewards paid per "
                              "tag or line) outweighs correctness",
                       fix="cap or length-normalise the length-related rewards; lower their weights relative to the "
                           "correctness reward; add soft_overlong_punishment"))

    def state(self) -> dict[str, Any]:
        """Everything `observe` has accumulated, as JSON-ready values (checkpoints keep it)."""
        return {"recent": {key: list(values) for key, values in self._recent.items()},
                "early": {key: list(values) for key, values in self._early.items()},
                "checks": {check.name: [check.active, check.false_streak] for check in self._checks}}

    def restore(self, state: Mapping[str, Any] | None) -> None:
        """Go on from `state()` of a monitor with the same settings; None (a checkpoint from before the monitor's
        state was kept) leaves this one fresh."""
        if not state:
            return
        self._recent = {key: deque(values, maxlen=2 * self.window) for key, values in state["recent"].items()}
        self._early = {key: list(values) for key, values in state["early"].items()}
        for check in self._checks:
            check.active, check.false_streak = state["checks"].get(check.name, (False, 0))

    @property
    def collapsing(self) -> bool:
        """A collapse alert (COLLAPSE_ALERTS) is on and its condition held at the last step."""
        return any(check.active and check.false_streak == 0 for check in self._checks
                   if check.name in COLLAPSE_ALERTS)

    def observe(self, step: int, metrics: Mapping[str, float | None]) -> list[Alert]:
        """Record one optimizer step's metrics; return the alerts whose condition starts at this step."""
        present = set()
        for key, value in metrics.items():
            if value is None:
                continue
            value = float(value)
            if not math.isfinite(value):
                continue
            present.add(key)
            self._recent.setdefault(key, deque(maxlen=2 * self.window)).append(value)
            early = self._early.setdefault(key, [])
            if len(early) < self.window:
                early.append(value)
        started = []
        for check in self._checks:
            if not present.issuperset(check.keys):
                continue
            result = check.test()
            if result is None:
                continue
            holds, message = result
            if not holds:
                check.false_streak += 1
                if check.false_streak >= self.rearm_steps:
                    check.active = False
                continue
            check.false_streak = 0
            if not check.active:
                check.active = True
                started.append(Alert(name=check.name, step=step, message=message, causes=check.causes, fix=check.fix))
        return started

    # Each test returns None while its windows are not full, else (condition holds, what was seen).

    def _mean(self, key: str, back: int = 0) -> float | None:
        """Mean of the `window` values of `key` that end `back` windows before the newest; None if too few."""
        values = self._recent.get(key, ())
        end = len(values) - back * self.window
        if end - self.window < 0:
            return None
        return statistics.fmean(list(values)[end - self.window:end])

    def _baseline(self, key: str) -> float | None:
        early = self._early.get(key, [])
        return statistics.median(early) if len(early) == self.window else None

    def _level(self, key: str, threshold: float, meaning: str) -> tuple[bool, str] | None:
        mean = self._mean(key)
        if mean is None:
            return None
        return mean >= threshold, (f"{key} averaged {mean:.3g} over the last {self.window} steps "
                                   f"(alert at >= {threshold:.3g}): {meaning.format(mean=mean)}")

    def _zero_spread(self) -> tuple[bool, str] | None:
        return self._level("frac_reward_zero_std", self.zero_spread,
                           "{mean:.0%} of the groups had the same reward for every completion, so they gave no "
                           "advantage and no learning signal")

    def _truncation(self) -> tuple[bool, str] | None:
        return self._level("completions/clipped_ratio", self.clipped,
                           "{mean:.0%} of the completions were cut off at max_completion_length")

    def _identical(self) -> tuple[bool, str] | None:
        return self._level("completions/frac_identical_in_group", self.identical,
                           "on average {mean:.0%} of a group's completions were exact copies of another in the group")

    def _entropy_collapse(self) -> tuple[bool, str] | None:
        mean, early = self._mean("entropy"), self._baseline("entropy")
        if mean is None or early is None:
            return None
        holds = mean < self.entropy_ratio * early and mean < self.entropy_floor
        return holds, (f"entropy averaged {mean:.3g} nats/token over the last {self.window} steps, down from an "
                       f"early median of {early:.3g} ({mean / early if early else 0.0:.2f}x; alert below "
                       f"{self.entropy_ratio:.3g}x and below {self.entropy_floor:.3g})")

    def _kl_blowup(self) -> tuple[bool, str] | None:
        mean, before = self._mean("kl"), self._mean("kl", back=1)
        if mean is None:
            return None
        if mean > self.kl_max:
            return True, (f"kl averaged {mean:.3g} over the last {self.window} steps (alert above {self.kl_max:.3g}): "
                          "the policy has moved far from its reference")
        if before is None:
            return None
        holds = mean > self.kl_floor and mean > self.kl_growth * before
        return holds, (f"kl averaged {mean:.3g} over the last {self.window} steps, up from {before:.3g} over the "
                       f"{self.window} before ({mean / before if before else math.inf:.3g}x; alert above "
                       f"{self.kl_growth:.3g}x and above {self.kl_floor:.3g})")

    def _length_hacking(self) -> tuple[bool, str] | None:
        keys = ("completions/mean_length", "reward", self.correctness_key)
        means = [self._mean(k) for k in keys]
        earlies = [self._baseline(k) for k in keys]
        if None in means or None in earlies:
            return None
        (length, reward, correct), (length0, reward0, correct0) = means, earlies
        holds = (length >= (1 + self.length_growth) * length0 and reward - reward0 >= self.reward_rise
                 and correct - correct0 <= self.correctness_delta)
        return holds, (f"over the last {self.window} steps completions/mean_length averaged {length:.4g} tokens "
                       f"against an early median of {length0:.4g} ({length / length0 if length0 else math.inf:.2f}x), "
                       f"reward {reward:.3g} against {reward0:.3g} ({reward - reward0:+.3g}), "
                       f"but {self.correctness_key} "
                       f"{correct:.3g} against {correct0:.3g} ({correct - correct0:+.3g}; alert when length grows "
                       f">= {1 + self.length_growth:.3g}x and reward by >= {self.reward_rise:.3g} while correctness "
                       f"gains <= {self.correctness_delta:.3g})")


COLLAPSE_ALERTS = ("entropy_collapse", "identical_completions")  # the policy samples one answer: no more signal


def collapse_stop(started: list[Alert], on_collapse: str) -> str | None:
    """With `on_collapse: stop`, the reason to end the run when one of `started` is a collapse; else None."""
    if on_collapse != "stop":
        return None
    collapse = next((a for a in started if a.name in COLLAPSE_ALERTS), None)
    return None if collapse is None else f"on_collapse stop: {collapse.name} at step {collapse.step}"


def collapse_adapt(started: list[Alert], on_collapse: str, temperature: float, step: float, ceiling: float, *,
                   collapsing: bool = False, since_raise: int | None = None, window: int = 10) -> float | None:
    """With `on_collapse: adapt`, the raised sampling temperature (by `step`, at most `ceiling`) when one of
    `started` is a collapse alert, or when the collapse still holds (`collapsing`: HealthMonitor.collapsing) a
    whole `window` of steps after the last raise (`since_raise` steps ago), the window it took to show; None when
    nothing changes (no collapse, another action, or already at the ceiling)."""
    if on_collapse != "adapt":
        return None
    persists = collapsing and since_raise is not None and since_raise >= window
    if not persists and not any(a.name in COLLAPSE_ALERTS for a in started):
        return None
    raised = round(min(temperature + step, ceiling), 6)
    return raised if raised > temperature else None


def append(path: Path, alert: Alert) -> None:
    """One alert as a line of an alerts.jsonl."""
    with open(path, "a") as f:
        f.write(json.dumps(dataclasses.asdict(alert)) + "\n")


def drop_after(path: Path, step: int) -> None:
    """Keep only the lines of steps up to `step` in a JSONL file of records with a "step" (alerts.jsonl,
    evaluations.jsonl): a resumed run writes the later ones again."""
    if path.is_file():
        lines = path.read_text().splitlines()
        path.write_text("".join(line + "\n" for line in lines if line.strip() and json.loads(line)["step"] <= step))
