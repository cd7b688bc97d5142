"""metric_for_best_model through the real CLI on the tiny model: best_model/ holds the weights of the best
evaluation's step (compared with that step's checkpoint), a worse later evaluation leaves it alone, the
direction follows greater_is_better, a resumed run keeps the best it had, and bad settings fail at start.

The metric is scripted: a reward that returns SCORES[step] for every completion, so the best step is known
(it is constant within each group, so it adds nothing to the advantages; the hash reward does the training).
"""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from grpokit.config import GRPOConfig, load_config
from grpokit.errors import ConfigError
from grpokit.evaluation.evaluate import eval_metric_names
from grpokit.train.best_model import BestModel, greater_is_better
from tests.conftest import run_cli, write_jsonl

REWARDS = '''
SCORES = {0: 0.5, 2: 0.25, 4: 0.75, 6: 0.625}  # evaluations at steps 0, 2, 4, 6: max at 4, min at 2


def text_hash_reward(completions, **kwargs):
    return [sum(i * ord(ch) for i, ch in enumerate(c, 1)) % 997 / 997 for c in completions]


def scripted(completions, step, **kwargs):
    return [SCORES.get(step, 0.0)] * len(completions)
'''
METRIC = "eval/rewards/scripted/mean"


def _setup(tmp_path, tiny_model_dir, **overrides):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"What is {a} + {b}?"} for a in range(4) for b in range(4)])
    write_jsonl(tmp_path / "eval.jsonl", [{"prompt": f"What is 9 + {b}?"} for b in range(2)])
    (tmp_path / "best_rewards.py").write_text(REWARDS)
    config = {"model": str(tiny_model_dir), "dataset": "train.jsonl", "eval_dataset": "eval.jsonl", "output_dir": "run",
              "reward_funcs": ["best_rewards.text_hash_reward", "best_rewards.scripted"], "num_generations": 4,
              "per_device_train_batch_size": 4, "max_completion_length": 6, "eval_max_completion_length": 3,
              "learning_rate": 1e-2, "beta": 0.0, "max_steps": 6, "save_steps": 2, "eval_steps": 2,
              "eval_on_start": True, "metric_for_best_model": "rewards/scripted/mean", "seed": 3, "device": "cpu",
              **overrides}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "cfg.yaml"


def _weights(directory):
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    assert out, f"no safetensors in {directory}"
    return out


def _same(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return all(torch.equal(wa[k], wb[k]) for k in wa)


def _record(directory):
    return json.loads((directory / "best_model" / "best_metric.json").read_text())


def test_best_model_is_the_best_evaluation_and_survives_resume(tmp_path, tiny_model_dir):
    cfg = _setup(tmp_path, tiny_model_dir)
    result = run_cli("train", str(cfg), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    assert _record(run) == {"metric": METRIC, "value": 0.75, "step": 4, "greater_is_better": True}
    assert _same(run / "best_model", run / "checkpoint-4")
    # the test can fail: training moved the weights between the evaluations
    assert not _same(run / "best_model", run / "checkpoint-2") and not _same(run / "best_model", run / "final_model")
    assert (run / "best_model" / "tokenizer_config.json").is_file()
    saved = [line for line in result.stdout.splitlines() if line.startswith("best model so far:")]
    assert saved == [f"best model so far: {METRIC} 0.5 at step 0 -> run/best_model",  # output_dir as configured
                     f"best model so far: {METRIC} 0.75 at step 4 -> run/best_model"]
    assert not list(tmp_path.glob("run/best_model.*")), "temporary directories left behind"
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())["best_model"]
    assert (state["value"], state["step"]) == (0.75, 4)

    # the start-time list of eval metrics is the list a real evaluation returns (a new eval metric goes in both)
    logged = {k for line in (run / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)
              if k.startswith("eval/")}
    assert set(eval_metric_names(load_config(cfg), ["text_hash_reward", "scripted"])) == logged

    # resumed into another directory after the best step: the checkpoint's best (0.75 at 4) still wins over
    # step 6's 0.625, and its best_model comes along
    resumed = run_cli("train", str(cfg), "--resume", str(run / "checkpoint-4"), "--set", "output_dir=resumed",
                      cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert _record(tmp_path / "resumed")["step"] == 4
    assert _same(tmp_path / "resumed" / "best_model", run / "checkpoint-4")
    assert _same(tmp_path / "resumed" / "final_model", run / "final_model")  # resume is still exact


def test_greater_is_better_false_keeps_the_minimum(tmp_path, tiny_model_dir):
    cfg = _setup(tmp_path, tiny_model_dir, max_steps=4, greater_is_better=False)
    result = run_cli("train", str(cfg), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    assert _record(run) == {"metric": METRIC, "value": 0.25, "step": 2, "greater_is_better": False}
    assert _same(run / "best_model", run / "checkpoint-2")


@pytest.mark.parametrize("dry_run", [False, True])
def test_unknown_metric_fails_at_start_with_the_list(tmp_path, tiny_model_dir, dry_run):
    cfg = _setup(tmp_path, tiny_model_dir, metric_for_best_model="rewards/scriptd/mean")
    result = run_cli("train", str(cfg), *(["--dry-run"] if dry_run else []), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "metric_for_best_model 'rewards/scriptd/mean' is not an eval metric" in result.stderr
    assert f"did you mean '{METRIC}'" in result.stderr
    assert "eval/accuracy, eval/completions/clipped_ratio" in result.stderr  # the available ones, listed
    assert not (tmp_path / "run" / "best_model").exists()


def test_best_model_needs_held_out_data(tmp_path, tiny_model_dir):
    cfg = _setup(tmp_path, tiny_model_dir, eval_dataset=None)
    result = run_cli("train", str(cfg), cwd=tmp_path)
    assert result.returncode == 2
    assert "metric_for_best_model 'rewards/scripted/mean' needs held-out data" in result.stderr
    assert "set eval_dataset" in result.stderr


# -- the tracker alone (no model) --------------------------------------------------------------------

def _tracker(tmp_path, **fields) -> BestModel:
    cfg = GRPOConfig(output_dir=str(tmp_path), metric_for_best_model="accuracy", **fields)
    return BestModel(cfg)


def _fake_save(path):
    path.mkdir()
    (path / "weights").write_text("w")


def test_default_direction_and_names():
    assert greater_is_better(GRPOConfig(metric_for_best_model="accuracy"))
    assert not greater_is_better(GRPOConfig(metric_for_best_model="eval/completions/mean_length"))
    assert not greater_is_better(GRPOConfig(metric_for_best_model="eval/loss"))
    assert greater_is_better(GRPOConfig(metric_for_best_model="eval/loss", greater_is_better=True))


def test_first_evaluation_is_the_authority_on_names(tmp_path):
    best = _tracker(tmp_path)
    with pytest.raises(ConfigError, match=r"checked at the evaluation at step 0.*eval/num_prompts"):
        best.observe({"eval/num_prompts": 2.0}, 0, _fake_save)


def test_nan_ties_and_worse_values_keep_the_saved_model(tmp_path):
    best = _tracker(tmp_path)
    assert not best.observe({"eval/accuracy": float("nan")}, 1, _fake_save)
    assert best.observe({"eval/accuracy": 0.5}, 2, _fake_save)
    assert not best.observe({"eval/accuracy": 0.5}, 3, _fake_save)  # a tie keeps the earlier
    assert not best.observe({"eval/accuracy": 0.25}, 4, _fake_save)
    assert json.loads((tmp_path / "best_model" / "best_metric.json").read_text())["step"] == 2


def test_resume_keeps_a_better_best_model_already_on_disk(tmp_path):
    # best_model/ from steps after the checkpoint (a run resumed in place from an earlier checkpoint)
    _tracker(tmp_path).observe({"eval/accuracy": 0.75}, 8, _fake_save)
    best = _tracker(tmp_path)
    best.restore({"metric": "eval/accuracy", "value": 0.5, "step": 4, "greater_is_better": True,
                  "path": str(tmp_path / "best_model")})
    assert (best.value, best.step) == (0.75, 8)
    assert not best.observe({"eval/accuracy": 0.625}, 6, _fake_save)
    # a checkpoint ranked by another metric does not count
    other = _tracker(tmp_path, greater_is_better=False)
    other.restore({"metric": "eval/accuracy", "value": 0.5, "step": 4, "greater_is_better": True, "path": None})
    assert other.value is None
