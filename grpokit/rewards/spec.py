"""Base classes for class-style rewards: `RewardSpec` (training-wizard's) and `RewardModel` (the math-QA trainer's).

Both are plain classes a user subclasses; neither needs torch. A subclass takes its settings in `__init__` (a
`[[reward_specs]]` table's keys, or a `reward_funcs` entry's `args`) and scores in `compute_reward`, which is called
with keyword arguments bound by parameter name, never by position (contract.py, "compute_reward"):

- `RewardSpec.compute_reward(self, prompts, completions, **kwargs)`: TRL's names, every dataset column in kwargs;
- `RewardModel.compute_reward(self, questions, answers, references)`: the prompt texts, the completion texts (the
  model's answers) and the dataset's reference column.

Any other signature binds the same way (`questions`, `answers`, `references`, column names, `**kwargs`).
`self.log_metrics({"precision": p, ...})` records values of this call; the trainer logs the mean over the step
as `rewards/<reward name>/<key>` in metrics.jsonl and every sink, also when the reward runs in its worker process.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

from grpokit.errors import RewardError

# the per-reward metrics the runner logs itself: a logged metric may not take their names
RESERVED_METRICS = ("mean", "std", "errors", "timeouts", "missing", "cache_hits")


class _LoggingReward:
    """`log_metrics` and the buffer the runner drains after each call."""

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Record `{name: value}` for this call: logged as `rewards/<reward name>/<name>` (the step's mean)."""
        if not isinstance(metrics, Mapping):
            raise RewardError(f"{type(self).__name__}.log_metrics takes a mapping {{name: number}}, got "
                              f"{type(metrics).__name__}")
        buffer = self.__dict__.setdefault("_grpokit_logged", {})
        for name, value in metrics.items():
            if not isinstance(name, str) or not name or "/" in name or name in RESERVED_METRICS:
                raise RewardError(f"{type(self).__name__}.log_metrics: metric name {name!r} is not allowed: give a "
                                  f"non-empty string without '/' that is not one of {list(RESERVED_METRICS)} (the "
                                  "runner logs those itself)")
            if hasattr(value, "item"):
                value = value.item()
            if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
                raise RewardError(f"{type(self).__name__}.log_metrics: metric {name!r} is {value!r}; give a finite "
                                  "number")
            buffer.setdefault(name, []).append(float(value))

    def take_logged_metrics(self) -> dict[str, list[float]]:
        """What `log_metrics` recorded since the last call, emptied."""
        return self.__dict__.pop("_grpokit_logged", {})


class RewardSpec(_LoggingReward):
    """Subclass and implement `compute_reward(self, prompts, completions, **kwargs) -> list[float | None]`."""

    def compute_reward(self, prompts, completions, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} subclasses RewardSpec but does not implement "
                                  "compute_reward(self, prompts, completions, **kwargs)")


class RewardModel(_LoggingReward):
    """Subclass and implement `compute_reward(self, questions, answers, references)`: a tensor or list of floats."""

    def compute_reward(self, questions, answers, references):
        raise NotImplementedError(f"{type(self).__name__} subclasses RewardModel but does not implement "
                                  "compute_reward(self, questions, answers, references)")
