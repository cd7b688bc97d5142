"""Keep the best model of a run: after each evaluation, `metric_for_best_model` decides whether the policy
is saved to OUTPUT_DIR/best_model/ (weights or LoRA adapter, tokenizer, best_metric.json).

With `validation_dataset` the metric is read from the validation evaluation (`validation/...`), and
best_metric.json also records the held-out accuracy at the chosen step: a score on data the choice
never saw, so "the best model is never below the untrained one" is not bought by selecting on the test.

The metric name is checked twice. At start, before the model loads, against the names an evaluation
of this run produces (`check_best_metric` in evaluation/evaluate.py, one of the early checks of
evaluation/preflight.py: the reward names, the fixed keys, pass@k / maj@k when eval_num_samples > 0).
At the first evaluation, against the metrics it actually returned: that check is the authority, so a
name the start list misses still fails before any further training.

Only a strict improvement replaces the saved model (ties keep the earlier, so a resumed run that
repeats an evaluation leaves best_model/ alone); NaN never counts as an improvement. The best value
and its step travel in every checkpoint (`state` / `restore`), and on resume a best_model/ already in
the output directory that is better still wins, so a resumed run never replaces a better best_model
with a worse one.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grpokit.config import GRPOConfig
from grpokit.evaluation.evaluate import best_metric_key, unknown_metric

log = logging.getLogger(__name__)

DIR_NAME = "best_model"
METRIC_FILE = "best_metric.json"


def greater_is_better(cfg: GRPOConfig) -> bool:
    """The config's `greater_is_better`, or its default: false for losses and lengths, else true."""
    if cfg.greater_is_better is not None:
        return cfg.greater_is_better
    return not (best_metric_key(cfg) or "").endswith(("loss", "length"))


class BestModel:
    """Tracks the best value of `metric_for_best_model` and saves the policy when it improves.
    With no metric configured every method does nothing. The metric's name is checked before (`check_best_metric`
    in evaluation/evaluate.py, one of the early checks) and at the first evaluation (`observe`)."""

    def __init__(self, cfg: GRPOConfig):
        self.metric = best_metric_key(cfg)
        self.greater = greater_is_better(cfg)
        self.dir = Path(cfg.output_dir) / DIR_NAME
        self.value: float | None = None
        self.step: int | None = None
        self.held_out: float | None = None  # eval/accuracy at the best step, when the metric is a validation one

    def improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.value is None:
            return True
        return value > self.value if self.greater else value < self.value

    def observe(self, result: dict[str, float], step: int, save: Callable[[Path], None] | None) -> bool:
        """After an evaluation: save the policy with `save(dir)` when `result` holds a new best. True when it is one.

        `save` None: only track the best (a process other than the main one, which writes)."""
        if self.metric is None:
            return False
        if self.metric not in result:  # the start check passed, but the evaluation disagrees: fail before training on
            raise unknown_metric(self.metric, [k for k in result if k.startswith(("eval/", "validation/"))],
                                  f"(checked at the evaluation at step {step})")
        value = float(result[self.metric])
        if not self.improves(value):
            return False
        held_out = result.get("eval/accuracy") if self.metric.startswith("validation/") else None
        if save is not None:
            self._write(value, step, save, held_out)
        self.value, self.step, self.held_out = value, step, held_out
        log.info("best model so far: %s %.4g at step %d -> %s", self.metric, value, step, self.dir)
        return True

    def _write(self, value: float, step: int, save: Callable[[Path], None], held_out: float | None) -> None:
        """best_model.tmp, then swapped in by rename: a process killed mid-write leaves the previous best intact."""
        tmp = self.dir.with_name(DIR_NAME + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a process killed mid-write
        save(tmp)
        (tmp / METRIC_FILE).write_text(json.dumps(self._record(value, step, held_out), indent=1) + "\n")
        self._swap_in(tmp)

    def _swap_in(self, tmp: Path) -> None:
        old = self.dir.with_name(DIR_NAME + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            self.dir.rename(old)
        tmp.rename(self.dir)
        shutil.rmtree(old, ignore_errors=True)

    def _record(self, value: float, step: int, held_out: float | None = None) -> dict[str, Any]:
        """best_metric.json: the metric, its value and step; with a validation metric also the held-out accuracy
        at that step (`held_out_accuracy`), the chosen model's score on data it was not chosen on."""
        record = {"metric": self.metric, "value": value, "step": step, "greater_is_better": self.greater}
        return record if held_out is None else {**record, "held_out_accuracy": held_out}

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any] | None:
        """What a checkpoint keeps: the best so far and where its weights are."""
        if self.metric is None or self.value is None:
            return None
        return {**self._record(self.value, self.step, self.held_out), "path": str(self.dir.resolve())}

    def restore(self, saved: dict[str, Any] | None) -> None:
        """On resume: the checkpoint's best, unless the metric or its direction changed since; a better
        best_model/ already in this output directory wins (it may come from steps after the checkpoint)."""
        if self.metric is None:
            return
        self._recover()
        for record, source in ((saved, "the checkpoint"), (self._on_disk(), str(self.dir))):
            if record is None or record.get("value") is None:
                continue
            if record.get("metric") != self.metric or record.get("greater_is_better", self.greater) != self.greater:
                log.info("best model: %s ranks by %s (greater_is_better %s), this run by %s (greater_is_better %s): "
                         "its best does not count", source, record.get("metric"), record.get("greater_is_better"),
                         self.metric, self.greater)
                continue
            if self.improves(float(record["value"])):
                self.value, self.step = float(record["value"]), int(record["step"])
                self.held_out = record.get("held_out_accuracy")
        if self.value is None:
            return
        here = self._on_disk() or {}
        if (here.get("metric"), here.get("step")) != (self.metric, self.step):
            self._copy_from(saved)
        log.info("best model so far (resumed): %s %.4g at step %d", self.metric, self.value, self.step)

    def _on_disk(self) -> dict[str, Any] | None:
        file = self.dir / METRIC_FILE
        return json.loads(file.read_text()) if file.is_file() else None

    def _recover(self) -> None:
        """A process killed between the two renames of `_write` leaves only best_model.old: put it back."""
        old = self.dir.with_name(DIR_NAME + ".old")
        if old.is_dir() and not self.dir.exists():
            old.rename(self.dir)

    def _copy_from(self, saved: dict[str, Any] | None) -> None:
        """Resumed into another output directory: bring the best model along when the checkpoint's run still has it."""
        source = Path(saved["path"]) if saved and saved.get("path") else None
        record = json.loads((source / METRIC_FILE).read_text()) if source and (source / METRIC_FILE).is_file() else None
        if record is None or (record.get("metric"), record.get("step")) != (self.metric, self.step):
            log.warning("best model: the best so far (%s %.4g at step %d) is neither in %s nor any more in %s; "
                        "best_model/ is written again only when an evaluation beats it", self.metric, self.value,
                        self.step, self.dir, source)
            return
        tmp = self.dir.with_name(DIR_NAME + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        self._swap_in(tmp)
        log.info("best model: copied %s (step %d) into %s", source, self.step, self.dir)
