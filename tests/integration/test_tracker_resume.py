"""The trackers through the real CLI on the tiny model: MLflow with a real local store holds every metric at every
step, and `--resume` continues the same MLflow run and the same W&B run (offline) instead of starting new ones."""

import json
import math

import pytest
import yaml

from grpokit.observe.metrics import mlflow_name
from tests.conftest import run_cli, write_jsonl

REWARDS = '''
def text_hash_reward(completions, **kwargs):
    return [sum(i * ord(ch) for i, ch in enumerate(c, 1)) % 997 / 997 for c in completions]
'''


def _setup(tmp_path, tiny_model_dir, **overrides):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)}
                                           for a in range(4) for b in range(3)])
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    config = {"model": str(tiny_model_dir), "dataset": "train.jsonl", "output_dir": "run",
              "reward_funcs": ["my_rewards.text_hash_reward", "number_correct"], "num_generations": 4,
              "per_device_train_batch_size": 4, "max_completion_length": 6, "learning_rate": 1e-2, "max_steps": 3,
              "save_steps": 2, "beta": 0.1, "seed": 3, "device": "cpu", **overrides}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_mlflow_holds_every_metric_at_every_step_and_resume_continues_its_run(tmp_path, tiny_model_dir, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this process reads the file store the run wrote

    _setup(tmp_path, tiny_model_dir, report_to="mlflow")
    env = {"MLFLOW_TRACKING_URI": "", "MLFLOW_EXPERIMENT_NAME": "grpokit-test"}
    first = run_cli("train", "cfg.yaml", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("grpokit-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    lines = _jsonl(tmp_path / "run" / "metrics.jsonl")
    expected: dict[str, set[int]] = {}
    for line in lines:
        for key, value in line.items():
            if key not in ("step", "timestamp") and value is not None and math.isfinite(value):
                expected.setdefault(mlflow_name(key), set()).add(line["step"])
    assert {"reward", "kl", "time/rewards", "time/reward/text_hash_reward", "rewards/number_correct/mean"} <= set(
        expected)
    for key, steps in expected.items():  # every metric, at every step it was logged
        assert {m.step for m in client.get_metric_history(run_id, key)} == steps, key

    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["trackers"] == {"mlflow": run_id}  # kept in the checkpoint
    resumed = run_cli("train", "cfg.yaml", "--resume", str(tmp_path / "run" / "checkpoint-2"), env=env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"  # the same run, finished
    history = client.get_metric_history(run_id, "reward")
    assert {m.step for m in history} == {1, 2, 3}
    # step 3 was logged by the stopped run after checkpoint-2 and again by the resumed one: MLflow keeps both, and
    # the resumed run says so (metrics.jsonl holds only the new value)
    assert sorted(m.step for m in history) == [1, 2, 3, 3]
    said = " ".join((resumed.stdout + resumed.stderr).split())
    assert "report_to mlflow: its run already holds steps 3-3 of the stopped run, logged after checkpoint-2" in said
    assert "MLflow cannot delete metric values" in said
    assert [line["step"] for line in _jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_wandb_offline_resume_continues_the_same_run(tmp_path, tiny_model_dir):
    _setup(tmp_path, tiny_model_dir, report_to="wandb")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HOME": str(tmp_path)}
    first = run_cli("train", "cfg.yaml", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = runs[0].name.rsplit("-", 1)[1]  # offline-run-<time>-<id>
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["trackers"] == {"wandb": run_id}
    resumed = run_cli("train", "cfg.yaml", "--resume", env=env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    ids = {p.name.rsplit("-", 1)[1] for p in (tmp_path / "run" / "wandb").glob("offline-run-*")}
    assert ids == {run_id}  # the resumed process wrote to the same run, not a new one
