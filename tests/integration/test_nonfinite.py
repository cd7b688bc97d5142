"""Non-finite losses: the optimizer step is skipped with weights and optimizer state unchanged; N in a row stop
the run with a clear error and a checkpoint of the last good weights (FAULTS.md row 7)."""

import json

import pytest
import torch

from grpokit.config import validate_config
from grpokit.errors import TrainingError
from grpokit.train.trainer import Trainer
from tests.conftest import write_jsonl


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "train.jsonl",
                [{"prompt": f"{a} + {b} =", "answer": str(a + b)} for a in range(4) for b in range(4)])
    (tmp_path / "nonfinite_rewards.py").write_text(
        "def text_hash(completions, **kwargs):\n"
        "    return [sum(i * ord(c) for i, c in enumerate(t, 1)) % 97 / 97 for t in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _trainer(model_dir, poisoned: set[int], **overrides) -> tuple[Trainer, dict]:
    cfg = validate_config({"model": str(model_dir), "dataset": "train.jsonl", "output_dir": "run", "device": "cpu",
                           "reward_funcs": ["nonfinite_rewards.text_hash"], "num_generations": 4,
                           "per_device_train_batch_size": 8,
                           "max_completion_length": 6, "learning_rate": 1e-2, "seed": 5, "save_steps": None,
                           **overrides})
    trainer = Trainer(cfg)
    real_logps, real_step = trainer.logprobs.of, trainer.step
    after: dict[int, tuple[dict, dict]] = {0: _snapshot(trainer)}

    def logps(model, mb):  # the policy's log-probs turn NaN on the poisoned steps (the reference's stay finite)
        values, entropy = real_logps(model, mb)
        if torch.is_grad_enabled() and trainer.state.global_step in poisoned:
            values = values * float("nan")
        return values, entropy

    def step(metrics_log):
        n = real_step(metrics_log)
        after[n] = _snapshot(trainer)
        return n

    trainer.logprobs.of, trainer.step = logps, step
    return trainer, after


def _snapshot(trainer):
    weights = {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}
    optimizer = {i: {k: v.clone() for k, v in s.items()} for i, s in trainer.optimizer.state_dict()["state"].items()}
    return weights, optimizer


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        _equal(a[k], b[k]) if isinstance(a[k], dict) else torch.equal(a[k], b[k]) for k in a)


def test_a_nan_step_is_skipped_with_weights_and_optimizer_unchanged(workdir, tiny_model_dir):
    trainer, after = _trainer(tiny_model_dir, poisoned={2}, max_steps=3, beta=0.1)
    trainer.train()
    weights_1, optimizer_1 = after[1]
    weights_2, optimizer_2 = after[2]
    assert not _equal(after[0][0], weights_1), "step 1 trains"
    assert _equal(weights_1, weights_2) and _equal(optimizer_1, optimizer_2), "the NaN step changed the model"
    assert not _equal(weights_2, after[3][0]), "the step after a skip trains again"
    lines = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_step"] for m in lines] == [0.0, 1.0, 0.0]
    assert lines[1]["loss"] is None  # NaN is written as null, not as a number


def test_consecutive_nan_steps_stop_the_run_with_the_last_good_weights_saved(workdir, tiny_model_dir):
    trainer, after = _trainer(tiny_model_dir, poisoned={2, 3, 4, 5}, max_steps=8, max_consecutive_skips=3)
    stopped = r"stopped at step 4: 3 optimizer steps in a row had a non-finite loss"
    with pytest.raises(TrainingError, match=stopped) as err:
        trainer.train()
    assert "run/checkpoint-4" in str(err.value) and "lower learning_rate" in str(err.value)
    saved = {k: v for k, v in _load(workdir / "run" / "checkpoint-4").items()}
    good = after[1][0]
    assert all(torch.equal(saved[k], good[k]) for k in saved), "the checkpoint must hold the weights of step 1"


def test_one_good_step_resets_the_count(workdir, tiny_model_dir):
    trainer, _ = _trainer(tiny_model_dir, poisoned={1, 2, 4, 5}, max_steps=6, max_consecutive_skips=3)
    trainer.train()  # 2 skips, a good step, 2 skips, a good step: never 3 in a row
    lines = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_step"] for m in lines] == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]


def _load(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")
