"""The console: grpokit's log lines (`console_logging`) and a live progress bar for training (step / total, reward,
KL, tokens/s and the ETA, drawn by tqdm).

`console_logging` sends grpokit's INFO lines (the per-step lines among them) to stdout as plain text and its
warnings and errors to stderr, prefixed: the CLI always; the Python API (GRPOTrainer) when the program has not set
up the "grpokit" logger itself, so a script prints what the CLI prints and its training_log.txt holds the same.

Only on a terminal: when stdout is a file or a pipe (CI, `> log.txt`) the bar is a no-op and the
console lines are all that is printed. While the bar is up, the log lines that go to the terminal
(the grpokit logger's and the root logger's console handlers) are written above it, not through it.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import TextIO

_POSTFIX_KEYS = (("reward", "reward"), ("kl", "kl"), ("tokens_per_second", "tok/s"))


class StdStreamHandler(logging.StreamHandler):
    """A StreamHandler on sys.stdout or sys.stderr as they are when a line is written, not when it was made (a
    program, a notebook or a test may replace them later); the progress bar may put its own stream in between."""

    def __init__(self, name: str):
        self._std = name
        self._above_bar = None
        super().__init__()

    @property
    def stream(self) -> TextIO:
        return self._above_bar or getattr(sys, self._std)

    @stream.setter
    def stream(self, value: TextIO) -> None:
        self._above_bar = value if isinstance(value, _AboveBar) else None


def console_logging(*, unless_configured: bool = False) -> None:
    """grpokit's INFO lines to stdout, warnings and errors to stderr ("grpokit: WARNING: ..."). With
    `unless_configured`, nothing changes when the "grpokit" logger already has a level or handlers of its own."""
    logger = logging.getLogger("grpokit")
    if unless_configured and (logger.level != logging.NOTSET or logger.handlers):
        return
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        out = StdStreamHandler("stdout")
        out.setLevel(logging.INFO)
        out.addFilter(lambda record: record.levelno < logging.WARNING)
        out.setFormatter(logging.Formatter("%(message)s"))
        err = StdStreamHandler("stderr")
        err.setLevel(logging.WARNING)
        err.setFormatter(logging.Formatter("grpokit: %(levelname)s: %(message)s"))
        logger.addHandler(out)
        logger.addHandler(err)


class NoProgress:
    def update(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class ProgressBar:
    def __init__(self, total_steps: int, start_step: int, stream: TextIO):
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", file=stream, dynamic_ncols=True,
                        desc="train", leave=False)
        self._handlers = _console_handlers()
        for handler in self._handlers:
            handler.setStream(_AboveBar(handler.stream, self.bar))

    def update(self, step: int, metrics: dict[str, float]) -> None:
        shown = {label: f"{metrics[key]:.4g}" for key, label in _POSTFIX_KEYS
                 if metrics.get(key) is not None and math.isfinite(metrics[key])}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(max(step - self.bar.n, 0))

    def close(self) -> None:
        for handler in self._handlers:
            if isinstance(handler.stream, _AboveBar):
                handler.setStream(handler.stream.stream)
        self.bar.close()


def progress_bar(total_steps: int, start_step: int = 0, stream: TextIO | None = None) -> ProgressBar | NoProgress:
    """A bar on `stream` (default stdout) when it is a terminal, else a do-nothing stand-in."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return ProgressBar(total_steps, start_step, stream) if isatty is not None and isatty() else NoProgress()


class _AboveBar:
    """A stream whose writes clear the bar first and redraw it after (tqdm's external_write_mode)."""

    def __init__(self, stream: TextIO, bar):
        self.stream = stream
        self.bar = bar

    def write(self, text: str) -> int:
        with self.bar.external_write_mode(file=self.stream):
            return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def _console_handlers() -> list[logging.StreamHandler]:
    loggers = (logging.getLogger("grpokit"), logging.getLogger())
    return [h for lg in loggers for h in lg.handlers
            if type(h) in (logging.StreamHandler, StdStreamHandler) and h.stream in (sys.stdout, sys.stderr)]
