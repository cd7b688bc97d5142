"""Metrics of a run and where they go.

Every step goes to OUTPUT_DIR/metrics.jsonl and, every `logging_steps`, a one-line summary to the
console (with a live progress bar when stdout is a terminal, see progress.py). `report_to` adds
sinks, each behind the same two methods (`log`, `close`) and each imported only when asked for:
  tensorboard  OUTPUT_DIR/tensorboard (`tensorboard --logdir OUTPUT_DIR/tensorboard`); a resumed run
               purges the events after its checkpoint's step
  wandb        wandb.init(project=$WANDB_PROJECT or 'grpokit', dir=OUTPUT_DIR unless $WANDB_DIR);
               WANDB_MODE=offline works as wandb documents it
  mlflow       $MLFLOW_TRACKING_URI, else a file store at OUTPUT_DIR/mlruns (experiment
               $MLFLOW_EXPERIMENT_NAME or 'grpokit'); the config goes in as flattened params
  trackio      trackio.init(project=$TRACKIO_PROJECT or 'grpokit'); data under trackio's own
               directory ($TRACKIO_DIR)
Non-finite values (NaN: nothing to average, e.g. a reward that applied to no completion) are
written as null to metrics.jsonl and left out of the numeric sinks. A resumed run continues the
wandb, mlflow and trackio runs its checkpoint names; none of them can delete the values a stopped
run logged after that checkpoint, so a warning says what each shows for those steps.

Names follow TRL (`reward`, `reward_std`, `rewards/{name}/mean`, `kl`, `entropy`, ...), so
dashboards built for TRL read grpokit's runs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from grpokit.errors import ConfigError

log = logging.getLogger(__name__)

_CONSOLE_KEYS = (("reward", "reward"), ("reward_std", "std"), ("kl", "kl"), ("entropy", "ent"), ("loss", "loss"),
                 ("grad_norm", "gnorm"), ("completions/mean_length", "len"), ("step_time", "s/step"))

# report_to name -> the module it needs (also the name of grpokit's pip extra)
SINK_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
DEFAULT_PROJECT = "grpokit"


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_sinks(report_to: str | list[str] | None) -> list[str]:
    """The sinks `report_to` asks for, resolved ('auto': tensorboard when installed; 'all': every installed one;
    'none'), with an error naming the pip extra for a listed one that is not installed. Call it before the
    model loads, so a missing package fails the run in seconds."""
    if report_to is None or report_to == "none":
        return []
    if report_to == "auto":
        return ["tensorboard"] if installed(SINK_MODULES["tensorboard"]) else []
    if report_to == "all":
        return [name for name, module in SINK_MODULES.items() if installed(module)]
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    for name in names:
        if name not in SINK_MODULES:
            raise ConfigError(f"report_to: unknown sink '{name}'; choose from {sorted(SINK_MODULES)}, "
                              "or 'auto', 'all', 'none'")
        if not installed(SINK_MODULES[name]):
            raise ConfigError(f"report_to includes '{name}' but {SINK_MODULES[name]} is not installed: "
                              f"pip install 'grpokit[{name}]' (or take '{name}' out of report_to)")
        _START_CHECKS.get(name, lambda: None)()
    return list(dict.fromkeys(names))


def _wandb_can_start() -> None:
    """W&B needs an API key unless it logs offline: without one, wandb.init fails after the model has loaded."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    import wandb

    try:
        wandb.login(verify=False)  # reads WANDB_API_KEY or the stored login; no network, no run
    except wandb.errors.UsageError as exc:
        raise ConfigError(f"report_to wandb: {exc} Run `wandb login` (or set WANDB_API_KEY), or set "
                          "WANDB_MODE=offline to log into OUTPUT_DIR/wandb and `wandb sync` it later") from None


def _mlflow_can_start() -> None:
    """A tracking server named by MLFLOW_TRACKING_URI must answer, and a database store needs SQLAlchemy."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.split(":", 1)[0] in ("sqlite", "postgresql", "mysql", "mssql") and not installed("sqlalchemy"):
        raise ConfigError(f"report_to mlflow: MLFLOW_TRACKING_URI={uri} is a database store, which needs the full "
                          "mlflow package (pip install mlflow); or unset MLFLOW_TRACKING_URI to log into "
                          "OUTPUT_DIR/mlruns")
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.tracking import MlflowClient

    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")  # one quick try
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # any failure to talk to the server, said in one line
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ConfigError(f"report_to mlflow: the tracking server MLFLOW_TRACKING_URI={uri} does not answer "
                          f"({reason}). Start it (mlflow server --port ...), correct MLFLOW_TRACKING_URI, or unset "
                          "it to log into OUTPUT_DIR/mlruns") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_START_CHECKS = {"wandb": _wandb_can_start, "mlflow": _mlflow_can_start}


class Sink(Protocol):
    """Where metrics go. `show`: the step is meant for the screen too (evaluation results are logged with False)."""

    def log(self, step: int, metrics: dict[str, float], show: bool) -> None: ...

    def close(self) -> None: ...


class MetricsLogger:
    """Fans each step's metrics out to the console, metrics.jsonl and the `report_to` sinks."""

    def __init__(self, output_dir: Path, total_steps: int, logging_steps: int = 1, echo=print,
                 resume_step: int | None = None, *, report_to: str | list[str] | None = "none",
                 run_config: dict[str, Any] | None = None, run_name: str | None = None,
                 trackers: dict[str, str] | None = None):
        """`trackers`: the run ids a checkpoint kept (`tracker_ids()` of the run it resumes): each tracker continues
        its run instead of starting another."""
        output_dir = Path(output_dir)
        self.path = output_dir / "metrics.jsonl"
        names = check_sinks(report_to)
        relogged = logged_after(self.path, resume_step)  # read before JsonlSink drops those lines
        self.sinks: list[Sink] = [JsonlSink(self.path, resume_step),
                                  ConsoleSink(total_steps, logging_steps, echo, resume_step)]
        try:
            for name in names:
                try:
                    self.sinks.append(_SINK_CLASSES[name](output_dir, run_config=run_config, run_name=run_name,
                                                          resume_step=resume_step,
                                                          resume_id=(trackers or {}).get(name)))
                except Exception as exc:  # the tracker's own error, said in one line naming it, not its traceback
                    detail = str(exc).splitlines()[0][:300] if str(exc) else ""
                    raise ConfigError(f"report_to {name}: could not start a run: {type(exc).__name__}: {detail} "
                                      f"(take '{name}' out of report_to to train without it)") from None
        except BaseException:
            self.close()
            raise
        for name, _ in _named(self.sinks):
            if relogged and name in _RELOG_NOTE and (trackers or {}).get(name):
                log.warning("report_to %s: its run already holds steps %d-%d of the stopped run, logged after "
                            "checkpoint-%d; %s (metrics.jsonl and TensorBoard hold only this run's values)", name,
                            resume_step + 1, relogged, resume_step, _RELOG_NOTE[name].format(next=relogged + 1))

    def log(self, step: int, metrics: dict[str, float], show: bool = True) -> None:
        for sink in self.sinks:
            sink.log(step, metrics, show)

    def tracker_ids(self) -> dict[str, str]:
        """{sink name: its run's id} for the trackers that have one (W&B, MLflow, trackio), for checkpoints."""
        return {name: sink.run_id for name, sink in _named(self.sinks) if getattr(sink, "run_id", None)}

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


# what a tracker does with the steps a resumed run logs again (none of them can delete values it holds: W&B's
# rewind is a private preview, MLflow and trackio have no call that removes a metric value)
_RELOG_NOTE = {
    "wandb": "W&B keeps its values for them and ignores this run's until step {next}",
    "mlflow": "MLflow cannot delete metric values, so each of those steps shows two values (the later is this run's)",
    "trackio": "trackio keeps both values for each of those steps (the later is this run's)",
}


def logged_after(path: Path, resume_step: int | None) -> int | None:
    """The last step metrics.jsonl holds past `resume_step` (a stopped run logged it after its checkpoint), or
    None."""
    if resume_step is None or not path.is_file():
        return None
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    last = max(steps, default=resume_step)
    return last if last > resume_step else None


class JsonlSink:
    """One JSON line per logged step; a resumed run keeps the lines up to its checkpoint's step."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        kept = []
        if resume_step is not None and path.is_file():
            # drop the lines the stopped run logged after the checkpoint it resumes from
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
        self._file = path.open("w")
        self._file.writelines(line + "\n" for line in kept)

    def log(self, step: int, metrics: dict[str, float], show: bool = True) -> None:
        # `timestamp`: when the line was written (Unix seconds), so runs line up and throughput reads from the file
        record = {"step": step, "timestamp": round(time.time(), 3), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ConsoleSink:
    """A one-line summary every `logging_steps` (and at the last step) through `echo`; a live progress bar
    (progress.py) when `stream` is a terminal, nothing more when it is not."""

    def __init__(self, total_steps: int, logging_steps: int = 1, echo=print, resume_step: int | None = None,
                 stream=None):
        from grpokit.observe.progress import progress_bar

        self.total_steps = total_steps
        self.logging_steps = logging_steps
        self.echo = echo
        self.progress = progress_bar(total_steps, resume_step or 0, sys.stdout if stream is None else stream)

    def log(self, step: int, metrics: dict[str, float], show: bool = True) -> None:
        if not show:
            return
        if step % self.logging_steps == 0 or step == self.total_steps:
            shown = " | ".join(f"{label} {metrics[key]:.4g}" for key, label in _CONSOLE_KEYS if key in metrics)
            self.echo(f"step {step}/{self.total_steps} | {shown}")
        self.progress.update(step, metrics)

    def close(self) -> None:
        self.progress.close()


class TensorBoardSink:
    """Scalars to OUTPUT_DIR/tensorboard; the run config as a text summary."""

    def __init__(self, output_dir: Path, *, run_config: dict | None = None, run_name: str | None = None,
                 resume_step: int | None = None, resume_id: str | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = output_dir / "tensorboard"
        # purge_step: TensorBoard hides the events a stopped run wrote after the checkpoint this run resumes from
        self.writer = SummaryWriter(str(self.log_dir), purge_step=None if resume_step is None else resume_step + 1)
        if run_config and resume_step is None:
            self.writer.add_text("config", "```\n" + json.dumps(run_config, indent=2, default=str) + "\n```", 0)

    def log(self, step: int, metrics: dict[str, float], show: bool = True) -> None:
        for key, value in finite(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run; WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY and WANDB_DIR are read by wandb itself."""

    def __init__(self, output_dir: Path, *, run_config: dict | None = None, run_name: str | None = None,
                 resume_step: int | None = None, resume_id: str | None = None):
        import wandb

        # resume_id: the run a checkpoint kept goes on (W&B keeps its own values for steps it already holds)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), name=run_name,
                              config=run_config, dir=None if os.environ.get("WANDB_DIR") else str(output_dir),
                              id=resume_id, resume="allow" if resume_id else None)
        self.run_id = self.run.id

    def log(self, step: int, metrics: dict[str, float], show: bool = True) -> None:
        self.run.log(finite(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class MLflowSink:
    """An MLflow run: the config as flattened params, metrics with their step."""

    def __init__(self, output_dir: Path, *, run_config: dict | None = None, run_name: str | None = None,
                 resume_step: int | None = None, resume_id: str | None = None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (output_dir / "mlruns").resolve().as_uri()
            # mlflow 3 keeps its file store only behind this opt-in; a database store needs the full mlflow
            # package (sqlalchemy), which the 'mlflow' extra does not pull in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT)
        if resume_id:  # the run a checkpoint kept goes on; the steps logged again hold a second value at that step
            self.run_id = resume_id
            self.client.update_run(resume_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(mlflow_name(k), str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in flatten(run_config or {}).items()]
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + MAX_PARAMS_TAGS_PER_BATCH])

    def log(self, step: int, metrics: dict[str, float], show: bool = True) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_name(k), v, now, step) for k, v in finite(metrics).items()]
        for start in range(0, len(batch), 1000):  # mlflow's limit of metrics per log_batch call
            self.client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class TrackioSink:
    """A trackio run (local, in trackio's directory; TRACKIO_DIR moves it)."""

    def __init__(self, output_dir: Path, *, run_config: dict | None = None, run_name: str | None = None,
                 resume_step: int | None = None, resume_id: str | None = None):
        import trackio

        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", DEFAULT_PROJECT),
                                name=resume_id or run_name, config=run_config,
                                resume="allow" if resume_id else "never")  # resume_id: the run's name, kept
        self.run_id = self.run.name

    def log(self, step: int, metrics: dict[str, float], show: bool = True) -> None:
        self.run.log(finite(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


_SINK_CLASSES = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MLflowSink, "trackio": TrackioSink}


def _named(sinks: list) -> list[tuple[str, Any]]:
    names = {cls: name for name, cls in _SINK_CLASSES.items()}
    return [(names[type(sink)], sink) for sink in sinks if type(sink) in names]


def finite(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics a numeric sink can plot: finite values as floats (None and NaN mean 'nothing to report')."""
    out = {}
    for key, value in metrics.items():
        if value is not None and math.isfinite(value := float(value)):
            out[key] = value
    return out


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and other values stay as they are."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def mlflow_name(key: str) -> str:
    """mlflow accepts letters, digits, '_', '-', '.', ' ', ':' and '/' in names ('rewards/acc/mean' is fine)."""
    return re.sub(r"[^\w\-. :/]", "_", key)


def generation_metrics(totals, rewards, names: list[str], completion_ids: list[list[int]], finish_reasons: list[str],
                       group_size: int) -> dict[str, float]:
    """TRL's reward and length metrics of one generation: `totals` [N] combined rewards, `rewards` [N, K]."""
    import torch

    from grpokit.algo.advantages import group_stats

    _, group_std, zero_spread = group_stats(totals, group_size)
    lengths = torch.tensor([len(c) for c in completion_ids], dtype=torch.float64)
    terminated = torch.tensor([r == "stop" for r in finish_reasons])
    m = {"reward": nanmean(totals), "reward_std": nanmean(group_std),
         "frac_reward_zero_std": float(zero_spread.double().mean()),
         "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
         "completions/max_length": float(lengths.max()),
         "completions/clipped_ratio": float((~terminated).double().mean()),
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


def name_collisions(names) -> list[tuple[str, str]]:
    """Pairs (a, b) of metric names where `a` is also a path prefix of `b` (`time/rewards` and `time/rewards/x`):
    sinks that store metrics as files (MLflow's file store) or as a tree (TensorBoard tags) cannot hold both."""
    ordered = sorted(set(names))
    return [(a, b) for i, a in enumerate(ordered) for b in ordered[i + 1:] if b.startswith(a + "/")]


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
