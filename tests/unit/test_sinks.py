"""Metric sinks: each writes what it should and reads back with its own tool (no network: wandb offline)."""

from __future__ import annotations

import io
import json
import logging
import math
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from grpokit.errors import ConfigError
from grpokit.observe.metrics import ConsoleSink, MetricsLogger, check_sinks, flatten, mlflow_name

STEPS = {1: {"reward": 0.25, "kl": 0.01, "rewards/acc/mean": math.nan, "time/generate": 1.5,
             "tokens_per_second": 100.0},
         2: {"reward": 0.5, "kl": 0.02, "rewards/acc/mean": 1.0, "time/generate": 2.5, "tokens_per_second": 200.0},
         3: {"reward": 0.75, "kl": 0.03, "rewards/acc/mean": 0.5, "time/generate": 3.5, "tokens_per_second": 300.0}}


def _run(tmp_path, report_to, **kwargs):
    logger = MetricsLogger(tmp_path, 3, echo=lambda line: None, report_to=report_to, **kwargs)
    for step, metrics in STEPS.items():
        logger.log(step, metrics)
    logger.close()
    return logger


# -- check_sinks ----------------------------------------------------------------------------------
def test_check_sinks_none_and_lists():
    assert check_sinks("none") == []
    assert check_sinks(None) == []
    with pytest.raises(ConfigError, match="unknown sink 'tensorbord'"):
        check_sinks(["tensorbord"])


def test_check_sinks_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec then reports it missing
    with pytest.raises(ConfigError, match=r"report_to includes 'wandb' but wandb is not installed: "
                                          r"pip install 'grpokit\[wandb\]'"):
        check_sinks(["tensorboard", "wandb"])
    assert "wandb" not in check_sinks("all")


def test_check_sinks_auto_picks_tensorboard_only_when_installed(monkeypatch):
    import tensorboard  # noqa: F401 - a dev dependency: make test installs every sink, so a missing one fails here
    assert check_sinks("auto") == ["tensorboard"]
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert check_sinks("auto") == []
    with pytest.raises(ConfigError, match=r"grpokit\[tensorboard\]"):
        MetricsLogger(".", 3, report_to=["tensorboard"])


# -- metrics.jsonl and the console -----------------------------------------------------------------
def test_jsonl_writes_null_for_nan_and_resume_truncates(tmp_path):
    _run(tmp_path, "none")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert lines[0]["rewards/acc/mean"] is None and lines[1]["time/generate"] == 2.5
    resumed = MetricsLogger(tmp_path, 3, echo=lambda line: None, resume_step=1)
    resumed.log(2, {"reward": 9.0})
    resumed.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["reward"]) for r in lines] == [(1, 0.25), (2, 9.0)]


def test_console_lines_every_logging_steps_and_nothing_else_off_a_terminal(tmp_path, capsys):
    echoed = []
    logger = MetricsLogger(tmp_path, 5, logging_steps=2, echo=echoed.append)
    for step in range(1, 6):
        logger.log(step, {"reward": step / 10, "kl": 0.5})
    logger.log(5, {"eval/accuracy": 1.0}, show=False)
    logger.close()
    assert echoed == ["step 2/5 | reward 0.2 | kl 0.5", "step 4/5 | reward 0.4 | kl 0.5",
                      "step 5/5 | reward 0.5 | kl 0.5"]
    assert capsys.readouterr().out == ""  # pytest's stdout is not a terminal: no progress bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_shows_step_reward_kl_throughput():
    screen = _Terminal()
    handler = logging.StreamHandler(sys.stdout)
    logging.getLogger("grpokit").addHandler(handler)
    try:
        sink = ConsoleSink(10, echo=lambda line: None, resume_step=2, stream=screen)
        assert handler.stream is not sys.stdout  # log lines are written above the bar while it is up
        sink.log(3, {"reward": 0.5, "kl": 0.125, "tokens_per_second": 1234.0})
        sink.progress.bar.refresh()
        drawn = screen.getvalue()
        sink.close()
        assert handler.stream is sys.stdout
    finally:
        logging.getLogger("grpokit").removeHandler(handler)
    assert "3/10" in drawn and "reward=0.5" in drawn and "kl=0.125" in drawn and "tok/s=1234" in drawn


# -- TensorBoard -------------------------------------------------------------------------------------
def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_per_step_and_resume_purges(tmp_path):
    import tensorboard  # noqa: F401 - a dev dependency: make test installs every sink, so a missing one fails here
    _run(tmp_path, ["tensorboard"], run_config={"beta": 0.0})
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["reward"] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert scalars["time/generate"] == [(1, 1.5), (2, 2.5), (3, 3.5)]
    assert scalars["rewards/acc/mean"] == [(2, 1.0), (3, 0.5)]  # NaN at step 1 is left out
    # TensorBoard reads event files in name order: <seconds>.<host>.<pid>.<writer counter>. A real resume is a new
    # process a second or more later; in this process, a counter past 9 ("10" < "9") could sort the new file first
    time.sleep(1.1)
    resumed = MetricsLogger(tmp_path, 3, echo=lambda line: None, report_to=["tensorboard"], resume_step=1)
    resumed.log(2, {"reward": 9.0})
    resumed.close()
    assert _scalars(tmp_path / "tensorboard")["reward"] == [(1, 0.25), (2, 9.0)]


# -- Weights & Biases (offline) -----------------------------------------------------------------------
def _wandb_records(path):
    """The records of an offline run's .wandb file: a 7-byte header, then LevelDB-log-style 32 KiB blocks of
    chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last), each record a wandb_internal Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_history_and_config(tmp_path, monkeypatch):
    import wandb  # a dev dependency: make test installs every sink, so a missing one fails here
    for key in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _run(tmp_path, ["wandb"], run_config={"beta": 0.04, "loss_type": "dapo"}, run_name="tiny-run")
    # wandb-core writes the offline file in the background; stopping it flushes (as exiting the process does)
    wandb.teardown()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    records = _wandb_records(runs[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == "tiny-run" and run.project == "grpokit"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["beta"] == 0.04 and config["loss_type"] == "dapo"
    history = [{item.nested_key[0] if item.nested_key else item.key: json.loads(item.value_json)
                for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [(h["_step"], h["reward"], h["time/generate"]) for h in history] == [(1, 0.25, 1.5), (2, 0.5, 2.5),
                                                                                (3, 0.75, 3.5)]
    assert "rewards/acc/mean" not in history[0] and history[1]["rewards/acc/mean"] == 1.0


def test_tracker_keys_from_the_environment_never_reach_the_run_directory(tmp_path, monkeypatch):
    """FAULTS.md row 12: keys are read by the trackers from the environment; no file of the run holds one."""
    import wandb  # a dev dependency: make test installs every sink, so a missing one fails here
    wandb_key = "ab12cd34" * 5  # wandb keys are 40 characters
    mlflow_secret = "mlflow-secret-" + "9z" * 10
    monkeypatch.setenv("WANDB_API_KEY", wandb_key)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", mlflow_secret)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", mlflow_secret)
    for key in ("WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    _run(tmp_path, ["tensorboard", "wandb", "mlflow"], run_config={"beta": 0.04, "api_key_env": "JUDGE_KEY"})
    wandb.teardown()
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert any("wandb" in f.parts for f in files) and any("mlruns" in f.parts for f in files)
    leaked = [f for f in files if wandb_key.encode() in f.read_bytes() or mlflow_secret.encode() in f.read_bytes()]
    assert not leaked, f"a tracker key was written to {leaked}"


# -- MLflow (file store) ------------------------------------------------------------------------------
def test_mlflow_file_store_metrics_and_params(tmp_path, monkeypatch):
    import mlflow  # noqa: F401 - a dev dependency: make test installs every sink, so a missing one fails here
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    logger = MetricsLogger(tmp_path, 3, echo=lambda line: None, report_to=["mlflow"], run_name="tiny-run",
                           run_config={"beta": 0.04, "reward_funcs": [{"func": "f", "weight": 2}], "nested": {"a": 1},
                                       "long": "x" * 7000})
    for step, metrics in STEPS.items():
        logger.log(step, {**metrics, "eval/pass@4": step / 4})
    logger.close()
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    run = client.get_run(logger.sinks[-1].run_id)
    assert run.info.run_name == "tiny-run" and run.info.status == "FINISHED"
    assert run.data.params["beta"] == "0.04" and run.data.params["nested.a"] == "1"
    assert run.data.params["reward_funcs"] == "[{'func': 'f', 'weight': 2}]"
    assert len(run.data.params["long"]) == 6000  # mlflow's limit on a param value
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
               for key in ("reward", "rewards/acc/mean", "time/generate", "eval/pass_4")}
    assert sorted(history["reward"]) == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert sorted(history["rewards/acc/mean"]) == [(2, 1.0), (3, 0.5)]
    assert sorted(history["time/generate"]) == [(1, 1.5), (2, 2.5), (3, 3.5)]
    assert sorted(history["eval/pass_4"]) == [(1, 0.25), (2, 0.5), (3, 0.75)]


def test_flatten_and_mlflow_names():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": [1], "f": {}}) == {"a.b": 1, "a.c.d": 2, "e": [1], "f": {}}
    assert mlflow_name("rewards/acc (x)/mean") == "rewards/acc _x_/mean"


# -- trackio (local store; in a subprocess because trackio reads TRACKIO_DIR when imported) ---------------
def test_trackio_local_run_holds_logs(tmp_path):
    import trackio  # noqa: F401 - a dev dependency: make test installs every sink, so a missing one fails here
    script = textwrap.dedent(f"""
        import json, math
        from pathlib import Path
        from grpokit.observe.metrics import MetricsLogger
        from trackio.sqlite_storage import SQLiteStorage
        logger = MetricsLogger(Path({str(tmp_path)!r}), 2, echo=lambda line: None, report_to=["trackio"],
                               run_name="tiny-run", run_config={{"beta": 0.04}})
        logger.log(1, {{"reward": 0.25, "kl": math.nan, "time/generate": 1.5}})
        logger.log(2, {{"reward": 0.5, "kl": 0.02, "time/generate": 2.5}})
        logger.close()
        print("RESULT " + json.dumps({{"logs": SQLiteStorage.get_logs("grpokit", "tiny-run"),
                           "config": SQLiteStorage.get_run_config("grpokit", "tiny-run")}}, default=str))
    """)
    env = {**__import__("os").environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "TRACKIO_PROJECT": "grpokit"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    logs = [log for log in result["logs"] if "reward" in log]
    assert [(log["step"], log["reward"], log["time/generate"]) for log in logs] == [(1, 0.25, 1.5), (2, 0.5, 2.5)]
    assert "kl" not in logs[0] and logs[1]["kl"] == 0.02
    assert result["config"]["beta"] == 0.04


# -- tracker start failures: a grpokit error before any model loads, saying what to set -----------------------------
def test_wandb_without_an_api_key_is_a_clear_error_unless_offline(tmp_path, monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # not a terminal: wandb cannot prompt
    with pytest.raises(ConfigError) as err:
        check_sinks(["wandb"])
    message = str(err.value)
    assert message.startswith("report_to wandb: No API key configured")
    assert "wandb login" in message and "WANDB_MODE=offline" in message and "\n" not in message
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert check_sinks(["wandb"]) == ["wandb"]


def test_mlflow_server_that_does_not_answer_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: nothing listens
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        check_sinks(["mlflow"])
    assert time.monotonic() - started < 60  # one quick try, not mlflow's minutes of retries
    message = str(err.value)
    assert "report_to mlflow: the tracking server MLFLOW_TRACKING_URI=http://127.0.0.1:9 does not answer" in message
    assert "unset it to log into OUTPUT_DIR/mlruns" in message and "\n" not in message


def test_mlflow_database_store_without_sqlalchemy_is_a_clear_error(monkeypatch):
    from grpokit.observe import metrics

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    real = metrics.installed
    monkeypatch.setattr(metrics, "installed", lambda module: False if module == "sqlalchemy" else real(module))
    with pytest.raises(ConfigError, match="database store, which needs the full mlflow package"):
        check_sinks(["mlflow"])


def test_a_tracker_that_fails_to_start_is_one_line_naming_it(tmp_path, monkeypatch):
    from grpokit.observe import metrics

    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("server said no\nand a long second line")

    monkeypatch.setitem(metrics._SINK_CLASSES, "trackio", Broken)
    with pytest.raises(ConfigError) as err:
        MetricsLogger(tmp_path, 3, echo=lambda line: None, report_to=["trackio"])
    assert str(err.value) == ("report_to trackio: could not start a run: RuntimeError: server said no (take "
                              "'trackio' out of report_to to train without it)")
    assert (tmp_path / "metrics.jsonl").exists()  # the JSONL sink was opened, and closed with the others
