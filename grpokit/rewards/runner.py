"""Run the reward functions of a step: in killable worker processes, with timeouts, counted errors and a cache.

Each reward function with `isolation="process"` (the default) lives in its own worker process,
forked when the runner starts (before the model loads, so the fork is small) and re-forked after
a kill. The functions of a step run in parallel, one worker each; `isolation="inline"` rewards
(torch reward models, HTTP judges, which enforce their own deadlines) run in this process
meanwhile. A timeout is enforced from outside by SIGKILL to the worker's process group, so it
works for code that never returns to the interpreter, from any thread (`signal.alarm` does
neither).

- A batch function that raises is called again one completion at a time, so only the completions
  that really fail are lost; a per-sample function is called once per completion and its timeout
  is per completion. Every failure (exception, timeout, non-finite value, dead worker) leaves a
  NaN ("missing"), is counted per function, logged with the completion, and written in full to
  `reward_errors.jsonl` when the runner has an error log. Never silently 0.
- When a function's failures exceed `error_rate_limit` of the completions it scored (after 32
  completions, or at once when every completion of a call failed), scoring raises RewardError.
- Wrong length or type is a bug in the function, not a sample: RewardError at once.
- `expensive` rewards keep a cache: an identical (prompt, completion, row) is scored once.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import signal
import time
import traceback
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch

from grpokit.errors import RewardError
from grpokit.rewards.contract import RewardBatch, RewardFunction, text_of

log = logging.getLogger(__name__)

MIN_COMPLETIONS_FOR_RATE = 32
LOGGED_PER_CALL = 3
_TIMEOUT = "timeout"


@dataclass(slots=True)
class _Failure:
    row: int  # index into the step's batch
    kind: str  # "error" or "timeout"
    detail: str
    trace: str = ""


@dataclass(slots=True, kw_only=True)
class RewardStats:
    total: int = 0  # completions seen, cached or not
    scored: int = 0  # completions the function was called on
    failures: int = 0
    errors: int = 0
    timeouts: int = 0
    missing: int = 0
    cache_hits: int = 0
    seconds: float = 0.0
    last_failure: str = ""


def _plain(value: Any) -> Any:
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, (str, bytes)) else value


def _describe(exc: BaseException) -> tuple[str, str]:
    return f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=-6)


def _serve(conn, func: RewardFunction, trainer_end, trainer_pid: int) -> None:
    """Worker loop. Requests: ("batch", batch) -> ("ok", values, logged) | ("raised", detail, trace);
    ("rows", batch, rows) -> ("row", i, value) | ("row_raised", i, detail, trace) per row, then ("done", logged).
    `logged`: what the reward gave log_metrics during the request (spec.py), {name: [values]}."""
    trainer_end.close()  # the fork copied it: while open here, the trainer's death would never reach recv()
    _die_with(trainer_pid)
    os.setpgrp()  # its own group: a kill takes whatever it started; Ctrl-C reaches only the trainer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        func.take_logged_metrics()  # what a failed call logged is not this request's
        if request[0] == "batch":
            try:
                conn.send(("ok", _plain(func.invoke(request[1])), func.take_logged_metrics()))
            except Exception as exc:  # untrusted user code; reported, then retried row by row
                conn.send(("raised", *_describe(exc)))
        else:
            _, batch, rows = request
            for i in rows:
                try:
                    conn.send(("row", i, _plain(func.invoke_row(batch, i))))
                except Exception as exc:  # untrusted user code: this row is missing, counted
                    conn.send(("row_raised", i, *_describe(exc)))
            conn.send(("done", func.take_logged_metrics()))


def _die_with(parent_pid: int) -> None:
    """Linux: the kernel SIGKILLs this worker when the trainer dies, even by kill -9 (PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pipe's EOF still ends the loop
        return
    if os.getppid() != parent_pid:  # the trainer died before prctl took effect
        os._exit(0)


class _Worker:
    def __init__(self, func: RewardFunction):
        self.func = func
        self.process = None
        self.conn = None

    def start(self) -> None:
        ctx = multiprocessing.get_context("fork")  # inherits the function as loaded: no pickling of user code
        parent, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, self.func, parent, os.getpid()), daemon=True,
                                   name=f"grpokit-reward-{self.func.name}")
        self.process.start()
        child.close()
        self.conn = parent

    def send(self, message) -> None:
        if self.process is None or not self.process.is_alive():
            self.restart()
        self.conn.send(message)

    def kill(self) -> None:
        if self.process is None:
            return
        for target in (lambda: os.killpg(self.process.pid, signal.SIGKILL), self.process.kill):
            try:
                target()
            except (ProcessLookupError, PermissionError):
                pass
        self.process.join(timeout=5)
        self.conn.close()
        self.process = self.conn = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def close(self) -> None:
        if self.process is not None and self.process.is_alive():
            try:
                self.conn.send(None)
                self.process.join(timeout=1)
            except (BrokenPipeError, OSError):
                pass
        self.kill()


@dataclass(slots=True, kw_only=True)
class _Job:
    k: int
    rows: list[int]  # rows of the step's batch this function still has to score
    mode: str  # "batch" or "rows"
    deadline: float = math.inf
    values: dict[int, Any] = field(default_factory=dict)
    failures: list[_Failure] = field(default_factory=list)


class RewardRunner:
    """Scores batches with every reward function; see the module docstring for the guarantees."""

    def __init__(self, funcs: list[RewardFunction], *, timeout: float | None = 60.0, error_rate_limit: float = 0.1,
                 error_log: str | Path | None = None, cache_size: int = 100_000):
        self.funcs = funcs
        self.timeout = timeout
        self.error_rate_limit = error_rate_limit
        self.error_log = Path(error_log) if error_log else None
        self.cache_size = cache_size
        self.caches: list[OrderedDict] = [OrderedDict() for _ in funcs]
        self.stats = [RewardStats() for _ in funcs]
        self._step = [RewardStats() for _ in funcs]
        self._logged: list[dict[str, list[float]]] = [{} for _ in funcs]  # log_metrics values since pop_metrics
        self.last_failures: list[str] = []  # of the last score() call
        self._warned_all_missing: set[str] = set()
        self.workers: list[_Worker | None] = [_Worker(f) if f.isolation == "process" else None for f in funcs]
        for w in self.workers:
            if w is not None:
                w.start()

    def close(self) -> None:
        for w in self.workers:
            if w is not None:
                w.close()
        for f in self.funcs:
            close = getattr(f.source, "close", None)
            if callable(close):
                close()

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def state(self) -> dict[str, Any]:
        """The run-long counts behind the error-rate limit and the once-only warnings, JSON-ready (checkpoints keep
        them, so a resumed run stops where the uninterrupted one would). The `expensive` caches are not kept."""
        return {"stats": {f.name: asdict(s) for f, s in zip(self.funcs, self.stats, strict=True)},
                "warned_all_missing": sorted(self._warned_all_missing)}

    def restore(self, state: dict[str, Any] | None) -> None:
        """Go on from `state()` (None: a checkpoint from before it was kept; this runner stays fresh)."""
        if not state:
            return
        for k, f in enumerate(self.funcs):
            if f.name in state["stats"]:
                self.stats[k] = RewardStats(**state["stats"][f.name])
        self._warned_all_missing = set(state["warned_all_missing"])

    # ---- one step --------------------------------------------------------------------------------
    def score(self, batch: RewardBatch) -> torch.Tensor:
        """[N, K] float64 rewards, NaN where a function said "not applicable" or failed."""
        n = len(batch)
        self.last_failures: list[str] = []
        matrix = torch.full((n, len(self.funcs)), math.nan, dtype=torch.float64)
        jobs: list[_Job] = []
        keys: list[list[str] | None] = []
        for k, f in enumerate(self.funcs):
            todo = list(range(n))
            keys.append(self._cache_keys(batch) if f.expensive else None)
            if keys[k] is not None:
                todo = [i for i in todo if not self._cached(k, keys[k][i], matrix, i)]
            self._step[k].cache_hits += n - len(todo)
            if todo:
                # sync per-sample functions go row by row (a timeout per completion); async ones gather at once
                jobs.append(_Job(k=k, rows=todo, mode="rows" if f.per_sample and not f.is_async else "batch"))
        started = time.monotonic()
        remote = [j for j in jobs if self.workers[j.k] is not None]
        for job in remote:
            self._submit(job, batch)
        for job in jobs:
            if self.workers[job.k] is None:
                t0 = time.monotonic()
                self._run_inline(job, batch)
                self._step[job.k].seconds += time.monotonic() - t0
        self._collect(remote, batch, started)
        for job in jobs:
            self._finish(job, batch, matrix, keys[job.k])
        for k, step in enumerate(self._step):
            step.total += n
            step.missing += int(matrix[:, k].isnan().sum())
        return matrix

    def pop_metrics(self) -> dict[str, float]:
        """Per-function counts since the last call: rewards/{name}/errors|timeouts|missing|cache_hits and
        time/reward/{name}; and rewards/{name}/{key}: the mean of what the function gave log_metrics since then."""
        metrics = {}
        for f, logged in zip(self.funcs, self._logged, strict=True):
            metrics.update({f"rewards/{f.name}/{key}": sum(values) / len(values) for key, values in logged.items()})
        self._logged = [{} for _ in self.funcs]
        for f, s in zip(self.funcs, self._step, strict=True):
            metrics[f"rewards/{f.name}/errors"] = float(s.errors)
            metrics[f"rewards/{f.name}/timeouts"] = float(s.timeouts)
            metrics[f"rewards/{f.name}/missing"] = s.missing / s.total if s.total else 0.0
            if f.expensive:
                metrics[f"rewards/{f.name}/cache_hits"] = float(s.cache_hits)
            metrics[f"time/reward/{f.name}"] = s.seconds  # not time/rewards/...: that is the phase's own total
        self._step = [RewardStats() for _ in self.funcs]
        return metrics

    # ---- running ---------------------------------------------------------------------------------
    def _submit(self, job: _Job, batch: RewardBatch) -> None:
        worker = self.workers[job.k]
        sub = batch.select(job.rows) if job.mode == "batch" else batch
        worker.send(("batch", sub) if job.mode == "batch" else ("rows", sub, job.rows))
        job.deadline = time.monotonic() + self.timeout if self.timeout else math.inf

    def _run_inline(self, job: _Job, batch: RewardBatch) -> None:
        f = self.funcs[job.k]
        f.take_logged_metrics()  # what an earlier failed call logged is not this step's
        if job.mode == "batch":
            try:
                job.values.update(zip(job.rows, f.check(f.invoke(batch.select(job.rows)), len(job.rows)), strict=True))
                self._keep_logged(job.k, f.take_logged_metrics())
                return
            except RewardError:
                raise
            except Exception:  # untrusted user code: find the completions that fail, one at a time
                f.take_logged_metrics()
        for i in job.rows:
            try:
                job.values[i] = f.invoke_row(batch, i)
            except RewardError:
                raise
            except Exception as exc:  # untrusted user code: this completion is missing, counted
                job.failures.append(_Failure(i, "error", *_describe(exc)))
        job.rows = []
        self._keep_logged(job.k, f.take_logged_metrics())

    def _keep_logged(self, k: int, logged: dict[str, list[float]]) -> None:
        for key, values in logged.items():
            self._logged[k].setdefault(key, []).extend(values)

    def _collect(self, jobs: list[_Job], batch: RewardBatch, started: float) -> None:
        active = {self.workers[j.k].conn: j for j in jobs}
        while active:
            now = time.monotonic()
            wait_for = max(0.0, min(j.deadline for j in active.values()) - now)
            ready = wait(list(active), timeout=None if math.isinf(wait_for) else wait_for)
            for conn in ready:
                job = active.pop(conn)
                if self._receive(job, batch):
                    active[self.workers[job.k].conn] = job
                else:
                    self._step[job.k].seconds += time.monotonic() - started
            now = time.monotonic()
            for conn, job in list(active.items()):
                if job.deadline <= now:
                    del active[conn]
                    if self._expire(job, batch):
                        active[self.workers[job.k].conn] = job
                    else:
                        self._step[job.k].seconds += time.monotonic() - started

    def _receive(self, job: _Job, batch: RewardBatch) -> bool:
        """Handle one message; True while the job still has rows in flight."""
        f, worker = self.funcs[job.k], self.workers[job.k]
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            worker.process.join(timeout=1)  # reap it, for the exit code
            code = worker.process.exitcode
            return self._lost(job, batch, "error", f"the worker process died (exit code {code})")
        kind = message[0]
        if kind == "ok":
            job.values.update(zip(job.rows, f.check(message[1], len(job.rows)), strict=True))
            self._keep_logged(job.k, message[2])
            job.rows = []
            return False
        if kind == "raised":  # the batch call failed: score the completions one at a time
            job.mode = "rows"
            self._submit(job, batch)
            return True
        if kind == "row":
            job.values[message[1]] = message[2]
        elif kind == "row_raised":
            job.failures.append(_Failure(message[1], "error", message[2], message[3]))
        if kind in ("row", "row_raised"):
            job.rows.remove(message[1])
            job.deadline = time.monotonic() + self.timeout if self.timeout else math.inf
            return True
        self._keep_logged(job.k, message[1])  # "done"
        return False

    def _expire(self, job: _Job, batch: RewardBatch) -> bool:
        return self._lost(job, batch, "timeout",
                          f"no result within reward_timeout={self.timeout:g}s; the worker was killed")

    def _lost(self, job: _Job, batch: RewardBatch, kind: str, detail: str) -> bool:
        """The worker is gone (killed or died): the rows in flight are missing; go on with the rest."""
        worker = self.workers[job.k]
        worker.restart()
        # a crash may be one completion's: retry one by one
        if job.mode == "batch" and kind == "error" and len(job.rows) > 1:
            job.mode = "rows"
            self._submit(job, batch)
            return True
        if job.mode == "batch" or not job.rows:
            job.failures += [_Failure(i, kind, detail) for i in job.rows]
            job.rows = []
            return False
        job.failures.append(_Failure(job.rows.pop(0), kind, detail))
        if not job.rows:
            return False
        self._submit(job, batch)
        return True

    # ---- bookkeeping -----------------------------------------------------------------------------
    def _finish(self, job: _Job, batch: RewardBatch, matrix: torch.Tensor, keys: list[str] | None) -> None:
        f, stats, step = self.funcs[job.k], self.stats[job.k], self._step[job.k]
        for i, value in job.values.items():
            value = f.check_value(value, i)
            if math.isinf(value):
                job.failures.append(_Failure(i, "error",
                                             f"returned {value} (rewards must be finite; None = not applicable)"))
                continue
            matrix[i, job.k] = value
            if keys is not None:
                self._remember(job.k, keys[i], value)
        scored = len(job.values) + sum(1 for x in job.failures if x.row not in job.values)
        for s in (stats, step):
            s.scored += scored
            s.errors += sum(x.kind == "error" for x in job.failures)
            s.timeouts += sum(x.kind == "timeout" for x in job.failures)
            s.failures += len(job.failures)
        all_missing = bool(matrix[sorted(job.values), job.k].isnan().all()) if job.values else False
        if all_missing and not job.failures and f.name not in self._warned_all_missing:
            self._warned_all_missing.add(f.name)
            log.warning("reward '%s' returned None (not applicable) for all %d completions it scored; if that is not "
                        "intended, check which columns it reads (`grpokit check CONFIG` shows its values)",
                        f.name, len(job.values))
        if not job.failures:
            return
        self._report(f, job.failures, batch)
        self.last_failures += [f"{x.kind} on completion {x.row}: {x.detail}" for x in job.failures]
        stats.last_failure = f"{job.failures[-1].detail}"
        every_one_failed = len(job.failures) >= scored
        if stats.failures > self.error_rate_limit * stats.scored and (
                stats.scored >= MIN_COMPLETIONS_FOR_RATE or every_one_failed):
            where = f"; every failure is in {self.error_log}" if self.error_log else ""
            raise RewardError(
                f"reward function '{f.name}' failed on {stats.failures} of {stats.scored} completions so far "
                f"({stats.errors} errors, {stats.timeouts} timeouts), above reward_error_rate_limit="
                f"{self.error_rate_limit:g}; last: {stats.last_failure}{where}. Fix the function (try "
                "`grpokit check CONFIG`), raise reward_timeout if it is just slow, or raise reward_error_rate_limit "
                "to tolerate failures")

    def _report(self, f: RewardFunction, failures: list[_Failure], batch: RewardBatch) -> None:
        for x in failures[:LOGGED_PER_CALL]:
            log.warning("reward '%s' %s on completion %d: %s | prompt: %.120r | completion: %.200r", f.name,
                        "timed out" if x.kind == "timeout" else "failed", x.row, x.detail,
                        text_of(batch.prompts[x.row]), text_of(batch.completions[x.row]))
        if len(failures) > LOGGED_PER_CALL:
            log.warning("reward '%s': %d more failures in this batch%s", f.name, len(failures) - LOGGED_PER_CALL,
                        f" (all in {self.error_log})" if self.error_log else "")
        if self.error_log is None:
            return
        self.error_log.parent.mkdir(parents=True, exist_ok=True)
        with self.error_log.open("a") as out:
            for x in failures:
                row = {k: v[x.row] for k, v in batch.columns.items()}
                out.write(json.dumps({"reward": f.name, "step": batch.context.get("step"), "kind": x.kind,
                                      "error": x.detail, "traceback": x.trace, "prompt": batch.prompts[x.row],
                                      "completion": batch.completions[x.row], "row": row}, default=str) + "\n")

    def _cache_keys(self, batch: RewardBatch) -> list[str]:
        return [json.dumps([batch.prompts[i], batch.completions[i], {k: v[i] for k, v in batch.columns.items()}],
                           sort_keys=True, default=str) for i in range(len(batch))]

    def _cached(self, k: int, key: str, matrix: torch.Tensor, i: int) -> bool:
        cache = self.caches[k]
        if key not in cache:
            return False
        cache.move_to_end(key)
        matrix[i, k] = cache[key]
        return True

    def _remember(self, k: int, key: str, value: float) -> None:
        cache = self.caches[k]
        cache[key] = value
        if len(cache) > self.cache_size:
            cache.popitem(last=False)
