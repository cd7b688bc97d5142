"""The run harness: what `grpokit train` and `grpokit sft` do around their steps, written once.

- the checkpoint `--resume` names, looked up before anything loads (`resume_checkpoint`); a new run into a
  directory that holds a run is refused, or with `--overwrite` the old run is moved aside whole (`claim_output_dir`);
- the run directory (`RunHarness.open`): `config.yaml`, `training_log.txt` (grpokit's log lines, as the
  console shows them), the metrics logger and its sinks, then the run's summary lines; all closed on exit.
  With several processes only the main one writes; the others get a logger that drops what it is given;
- the steps (`RunHarness.run`) until `max_steps`, or until `max_train_seconds` of training (the steps' own
  time, kept in checkpoints) have passed: a checkpoint every `save_steps` (none at the last step: the final
  model is written then; one when the budget or another reason (`on_collapse: stop`) ends the run early, so
  that it can go on). SIGINT / SIGTERM
  (`StopSignals`) finish the step in progress, write a checkpoint and stop with `Interrupted` (exit status
  128 + the signal), naming the command that resumes.
  With several processes every one stops after the same step, whichever got the signal.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from grpokit.config.schema import GRPOConfig
from grpokit.errors import ConfigError, Interrupted
from grpokit.observe.metrics import MetricsLogger
from grpokit.runtime.distributed import Processes
from grpokit.train import checkpoint

log = logging.getLogger(__name__)

LOG_FILE = "training_log.txt"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# what a run writes into its output_dir: a directory holding any of these holds a run
RUN_FILES = ("metrics.jsonl", "config.yaml", LOG_FILE, "final_model", "best_model", "evaluations.jsonl",
             "alerts.jsonl", "completions", "reward_errors.jsonl", "best_metric.json")


def existing_run(out: Path) -> str | None:
    """What `out` holds of an earlier run, in words (steps logged, checkpoints, models); None when it holds none."""
    if not out.is_dir():
        return None
    parts = []
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        steps = sum(1 for line in metrics.read_text(errors="replace").splitlines() if line.strip())
        parts.append(f"{steps} logged step(s) in metrics.jsonl")
    checkpoints = sorted((c for c in out.glob("checkpoint-*") if c.name.removeprefix("checkpoint-").isdigit()),
                         key=lambda c: int(c.name.removeprefix("checkpoint-")))
    if checkpoints:
        parts.append(f"{len(checkpoints)} checkpoint(s) ({', '.join(c.name for c in checkpoints[-3:])}"
                     f"{', ...' if len(checkpoints) > 3 else ''})")
    parts += [name for name in ("final_model", "best_model") if (out / name).exists()]
    if not parts:
        parts = [name for name in RUN_FILES if (out / name).exists()]
    return ", ".join(parts) or None


def claim_output_dir(out: Path, *, resume: str | bool | None, overwrite: bool, command: str = "train",
                     config_name: str = "CONFIG", main: bool = True) -> Path | None:
    """Before anything loads: a new run (no `resume`) into a directory that holds a run stops, naming what is there;
    with `overwrite` the old run is moved aside whole to `OUTPUT_DIR.old-<UTC time>` first. Returns where it went
    (None: nothing moved). Only the main process moves it (`main`); the others trust its check."""
    if resume or not main:
        return None
    held = existing_run(out)
    if held is None:
        return None
    if not overwrite:
        raise ConfigError(f"output_dir '{out}' holds a run ({held}); a new run there would overwrite it. Go on "
                          f"with it: grpokit {command} {config_name} --resume; or start anew with --overwrite (the "
                          f"old run is moved, whole, to {out}.old-<time>); or give another output_dir")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = out.with_name(f"{out.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = out.with_name(f"{out.name}.old-{stamp}-{n}")
    out.rename(target)
    log.info("--overwrite: the run that was in %s (%s) is now in %s", out, held, target)
    return target


def resume_checkpoint(cfg: GRPOConfig, resume: str | bool | None, kind: str = "grpo") -> Path | None:
    """The checkpoint `--resume` names (True: the newest in output_dir; or a path), written by a run of `kind`;
    None without `resume`. Cheap and model-free: call it before anything loads. The settings `cfg` was given as
    'auto' take the values the checkpoint's run settled on (another machine, or a newer default, would settle them
    otherwise), so that the resumed run computes as it began."""
    if not resume:
        return None
    path = checkpoint.find(Path(cfg.output_dir), resume, kind=kind)
    for said in cfg.keep_settled(checkpoint.saved_config(path), str(path)):
        log.info("%s", said)
    return path


class StopSignals:
    """While active, SIGINT / SIGTERM only set `received` (the loop checkpoints and stops at the end of the step);
    a second signal abandons the step at once (KeyboardInterrupt). Inactive off the main thread."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        self.say(f"{signal.Signals(signum).name} received: finishing this step, then writing a checkpoint "
                 "(send it again to stop at once without one)")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class RunHarness:
    """One run's directory and step loop. `command` and `config_name` make the resume hint
    (`grpokit COMMAND CONFIG_NAME --resume`); `procs` is the job's processes (None: this one alone)."""

    def __init__(self, cfg: GRPOConfig, *, command: str, config_name: str = "CONFIG", procs: Processes | None = None,
                 say: Callable[[str], None] = log.info):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.command, self.config_name = command, config_name
        self.procs = procs
        self.main = procs is None or procs.is_main
        self.say = say

    @contextmanager
    def open(self, *, resume_step: int | None, summary: Iterable[str] = (),
             trackers: dict[str, str] | None = None) -> Iterator[MetricsLogger | _Silent]:
        """The run directory for the run's span: config.yaml, the log file and the metrics logger, then `summary`
        said line by line. `resume_step`: the checkpoint's step (metrics.jsonl keeps the lines up to it);
        `trackers`: the tracker run ids the checkpoint kept (each continues its run)."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.main:
            (self.out / "config.yaml").write_text(cfg.to_yaml())
        handler = logging.FileHandler(self.out / LOG_FILE) if self.main else logging.NullHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger("grpokit").addHandler(handler)
        try:
            metrics_log = (MetricsLogger(self.out, cfg.max_steps, cfg.logging_steps, echo=self.say,
                                         resume_step=resume_step, report_to=cfg.report_to,
                                         run_config=cfg.model_dump(mode="json"), run_name=self.out.name,
                                         trackers=trackers)
                           if self.main else _Silent())
            try:
                for line in summary:
                    self.say(line)
                yield metrics_log
            finally:
                metrics_log.close()
        finally:
            logging.getLogger("grpokit").removeHandler(handler)
            handler.close()

    def run(self, *, step: Callable[[], int], position: Callable[[], int], save: Callable[[], Path],
            spent: Callable[[], float], before: Callable[[], Any] | None = None,
            after: Callable[[int], Any] | None = None, stop: Callable[[], str | None] | None = None) -> None:
        """Call `step()` (it returns the step it made) until `position()` reaches max_steps, `spent()` (the
        seconds of training so far) reaches max_train_seconds, or `stop()` gives a reason to end the run early
        (any process's); `save()` writes a checkpoint and returns its path. `before` runs once, `after(step)` after
        each step, both under the signal handlers."""
        cfg = self.cfg
        budget = cfg.max_train_seconds
        if budget is not None:
            self.say(f"budget: max_train_seconds {budget:g}: the run ends at the first step end after {budget:g} s "
                     f"of training ({spent():.0f} s so far), or at step {cfg.max_steps}")
            if spent() >= budget and position() < cfg.max_steps:  # a resumed run whose budget is spent already
                self.say(f"max_train_seconds {budget:g} already spent ({spent():.0f} s): no more steps")
                return
        with StopSignals(self.say) as signals:
            if before is not None:
                before()
            while position() < cfg.max_steps:
                current = step()
                if after is not None:
                    after(current)
                received, reason, seconds = self._agree(signals.received, stop() if stop is not None else None,
                                                        spent())
                if received is not None:
                    path = save()
                    raise Interrupted(f"stopped by {signal.Signals(received).name} after step {current}; checkpoint "
                                      f"written to {path}. Resume with: grpokit {self.command} {self.config_name} "
                                      "--resume", 128 + received)
                if reason is None and budget is not None and seconds >= budget:
                    reason = f"max_train_seconds {budget:g} reached ({seconds:.0f} s of training)"
                if reason is not None and current < cfg.max_steps:
                    self.say(f"{reason}: the run ends after step {current} of {cfg.max_steps}")
                    if cfg.save_steps:
                        save()  # so that --resume (a larger budget, or none) goes on from here
                    return
                if cfg.save_steps and current % cfg.save_steps == 0 and current < cfg.max_steps:
                    save()

    def _agree(self, received: int | None, reason: str | None, seconds: float) -> tuple[int | None, str | None, float]:
        """What every process acts on after a step, in one exchange: the signal any process got, the first
        process's reason to end early, the longest training time; so every process stops after the same step."""
        if self.procs is None or self.procs.count == 1:
            return received, reason, seconds
        parts = self.procs.gather((received, reason, seconds))
        return (max((r for r, _, _ in parts if r is not None), default=None),
                next((why for _, why, _ in parts if why is not None), None), max(t for _, _, t in parts))


class _Silent:
    """The metrics logger of a process other than the main one."""

    def log(self, step: int, metrics: dict[str, float], show: bool = True) -> None:
        pass

    def close(self) -> None:
        pass
