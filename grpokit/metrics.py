"""Metric sinks: every step to OUTPUT_DIR/metrics.jsonl, a short line to the console.

Names follow TRL (`reward`, `reward_std`, `rewards/{name}/mean`, `kl`, `entropy`, ...), so
dashboards built for TRL read grpokit's runs.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

_CONSOLE_KEYS = (("reward", "reward"), ("reward_std", "std"), ("kl", "kl"), ("entropy", "ent"), ("loss", "loss"),
                 ("grad_norm", "gnorm"), ("completions/mean_length", "len"), ("step_time", "s/step"))


class MetricsLogger:
    def __init__(self, output_dir: Path, total_steps: int, logging_steps: int = 1, echo=print,
                 resume_step: int | None = None):
        self.path = output_dir / "metrics.jsonl"
        self.total_steps = total_steps
        self.logging_steps = logging_steps
        self.echo = echo
        if resume_step is None:
            self._file = self.path.open("w")  # a new run starts a new file
            return
        # a resumed run keeps the lines up to its checkpoint's step and drops those the stopped run logged after it
        kept = [line for line in (self.path.read_text().splitlines() if self.path.is_file() else [])
                if line.strip() and json.loads(line)["step"] <= resume_step]
        self._file = self.path.open("w")
        self._file.writelines(line + "\n" for line in kept)

    def log(self, step: int, metrics: dict[str, float], show: bool = True) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if show and (step % self.logging_steps == 0 or step == self.total_steps):
            shown = " | ".join(f"{label} {metrics[key]:.4g}" for key, label in _CONSOLE_KEYS if key in metrics)
            self.echo(f"step {step}/{self.total_steps} | {shown}")

    def close(self) -> None:
        self._file.close()


def generation_metrics(totals, rewards, names: list[str], completion_ids: list[list[int]], finish_reasons: list[str],
                       group_size: int) -> dict[str, float]:
    """TRL's reward and length metrics of one generation: `totals` [N] combined rewards, `rewards` [N, K]."""
    import torch

    from grpokit.advantages import group_stats

    _, group_std, zero_spread = group_stats(totals, group_size)
    lengths = torch.tensor([len(c) for c in completion_ids], dtype=torch.float64)
    terminated = torch.tensor([r == "stop" for r in finish_reasons])
    m = {"reward": nanmean(totals), "reward_std": nanmean(group_std),
         "frac_reward_zero_std": float(zero_spread.double().mean()),
         "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
         "completions/max_length": float(lengths.max()), "completions/clipped_ratio": float((~terminated).double().mean()),
         "completions/mean_terminated_length": float(lengths[terminated].mean()) if terminated.any() else 0.0}
    for k, name in enumerate(names):
        column = rewards[:, k]
        valid = column[~torch.isnan(column)]
        m[f"rewards/{name}/mean"] = nanmean(column)
        m[f"rewards/{name}/std"] = float(valid.std()) if valid.numel() > 1 else 0.0
    return m


def nanmean(values) -> float:
    """Mean of the non-NaN entries of a tensor; NaN when there are none."""
    valid = values[~values.isnan()]
    return float(valid.mean()) if valid.numel() else math.nan


def _jsonable(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


class Timers:
    """Named wall-clock timers whose totals become `time/{name}` metrics."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.totals.items()}
        self.totals = {}
        return out
