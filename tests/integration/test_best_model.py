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
from grpokit.evaluation.evaluate import best_metric_key, check_best_metric, eval_metric_names
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


VALIDATION_REWARDS = REWARDS + '''
VALIDATION = {0: 0.5, 2: 0.875, 4: 0.25, 6: 0.375}  # on the validation prompts ("7 + b"): max at 2


def by_split(prompts, completions, step, **kwargs):
    return [(VALIDATION if p.startswith("What is 7 +") else SCORES).get(step, 0.0) for p in prompts]
'''


def _setup(tmp_path, tiny_model_dir, rewards=REWARDS, **overrides):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"What is {a} + {b}?"} for a in range(4) for b in range(4)])
    write_jsonl(tmp_path / "eval.jsonl", [{"prompt": f"What is 9 + {b}?"} for b in range(2)])
    (tmp_path / "best_rewards.py").write_text(rewards)
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


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
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


def test_validation_split_chooses_the_model_and_the_held_out_split_reports_it(tmp_path, tiny_model_dir):
    # a validation prompt that is also a train prompt, and one that is also a held-out prompt, are left out
    write_jsonl(tmp_path / "val.jsonl", [{"prompt": p} for p in ("What is 7 + 0?", "What is 7 + 1?",
                                                                "What is 0 + 0?", "What is 9 + 1?")])
    cfg = _setup(tmp_path, tiny_model_dir, rewards=VALIDATION_REWARDS, validation_dataset="val.jsonl",
                 reward_funcs=["best_rewards.text_hash_reward", "best_rewards.by_split"],
                 metric_for_best_model="rewards/by_split/mean")
    dry = run_cli("train", str(cfg), "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "2 held-out, 2 validation" in dry.stdout
    assert "validation_dataset 'val.jsonl': 2 of 4 prompts are also training or held-out prompts" in dry.stderr
    result = run_cli("train", str(cfg), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    held_out_at_2 = next(m["eval/accuracy"] for m in metrics if m["step"] == 2 and "eval/accuracy" in m)
    # chosen at step 2, the validation maximum; the held-out maximum (step 4) would have been chosen on the test
    assert _record(run) == {"metric": "validation/rewards/by_split/mean", "value": 0.875, "step": 2,
                            "greater_is_better": True, "held_out_accuracy": held_out_at_2}
    assert _same(run / "best_model", run / "checkpoint-2")
    logged = {k for m in metrics for k in m if k.startswith("validation/")}
    assert set(eval_metric_names(load_config(cfg), ["text_hash_reward", "by_split"], "validation")) == logged
    assert [m["eval/rewards/by_split/mean"] for m in metrics if "eval/rewards/by_split/mean" in m] == [
        0.5, 0.25, 0.75, 0.625]  # steps 0, 2, 4 and after training (6): the held-out values are the SCORES
    splits = [(e["step"], e["split"], len(e["accuracy"])) for e in
              map(json.loads, (run / "evaluations.jsonl").read_text().splitlines())]
    assert splits == [(s, split, 2) for s in (0, 2, 4, 6) for split in ("eval", "validation")]
    assert "validation accuracy before training" in result.stdout
    assert (f"best model: step 2, chosen on validation/rewards/by_split/mean 0.875; held-out accuracy there "
            f"{100 * held_out_at_2:.1f}%") in result.stdout


def test_a_split_named_without_its_data_fails_at_start(tmp_path, tiny_model_dir):
    cfg = _setup(tmp_path, tiny_model_dir, metric_for_best_model="validation/accuracy")
    result = run_cli("train", str(cfg), "--dry-run", cwd=tmp_path)
    assert result.returncode == 2
    assert "metric_for_best_model 'validation/accuracy' needs validation_dataset" in result.stderr


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
    assert "metric_for_best_model 'rewards/scripted/mean' needs eval_dataset" in result.stderr
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


def test_a_bare_name_means_the_validation_split_when_there_is_one(caplog):
    assert best_metric_key(GRPOConfig(metric_for_best_model="accuracy")) == "eval/accuracy"
    with_validation = {"metric_for_best_model": "accuracy", "validation_dataset": "v.jsonl"}
    assert best_metric_key(GRPOConfig(**with_validation)) == "validation/accuracy"
    explicit = GRPOConfig(**{**with_validation, "metric_for_best_model": "eval/accuracy"})
    assert best_metric_key(explicit) == "eval/accuracy"
    with caplog.at_level("WARNING", logger="grpokit"):
        check_best_metric(explicit, [], has_eval_data=True, has_validation_data=True)
    assert "the held-out score of best_model/ is then selected on" in caplog.text
    with pytest.raises(ConfigError, match="needs eval_dataset"):
        check_best_metric(explicit, [], has_eval_data=False, has_validation_data=True)


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
