"""Reward faults through the real CLI (FAULTS.md rows 1 and 2) and the pre-flight `grpokit check`."""

import json
import time

import yaml

from tests.conftest import run_cli, write_jsonl

REWARDS = '''
import time

from grpokit import per_sample


def good(completions, answer, **kwargs):
    return [1.0 if str(a) in c else 0.0 for c, a in zip(completions, answer)]


def fails_on_empty(completions, **kwargs):
    return [1.0 / len(c) for c in completions]


def wrong_type(completions, **kwargs):
    return "high"


def slow(completions, **kwargs):
    time.sleep(10)
    return [0.0] * len(completions)


@per_sample
def text_length(completion):
    return float(len(completion))


def always_fails(completions, **kwargs):
    raise KeyError("score")
'''


def _setup(tmp_path, model="nobody/not-downloaded", **overrides):  # a hub id: loading it offline would fail
    rows = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(5) for b in range(4)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    config = {"model": str(model), "dataset": "train.jsonl", "output_dir": "run", "num_generations": 4,
              "per_device_train_batch_size": 8, "max_completion_length": 8, "max_steps": 2, "device": "cpu",
              "reward_timeout": 1.0, **overrides}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "cfg.yaml"


def test_check_runs_every_reward_before_any_model_loads(tmp_path):
    cfg = _setup(tmp_path, reward_funcs=["my_rewards.good", "my_rewards.text_length", "number_correct"])
    result = run_cli("check", str(cfg), "--quiet-config", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr  # the model is never downloaded: nothing loaded it
    out = result.stdout
    assert "reward 'good' (function, killable worker)" in out
    assert "reward 'text_length' (function, per-sample, killable worker)" in out
    assert "reference answer (answer)" in out and "[1, 1, 1]" in out and "empty completion" in out
    assert "pre-flight: OK" in out


def test_check_reports_failures_types_and_timeouts(tmp_path):
    cfg = _setup(tmp_path, reward_funcs=["my_rewards.fails_on_empty", "my_rewards.wrong_type", "my_rewards.slow",
                                         "my_rewards.good"])
    started = time.monotonic()
    result = run_cli("check", str(cfg), "--quiet-config", cwd=tmp_path)
    assert time.monotonic() - started < 60
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "FAIL empty completion: 3 of 3 failed: error on completion 0: ZeroDivisionError" in out
    assert "FAIL reference answer (answer): reward function 'wrong_type' returned str" in out
    assert "timeout on completion 0: no result within reward_timeout=1s" in out
    assert "pre-flight: FAILED, 5 problem(s) above" in out  # fails_on_empty 1, wrong_type 2, slow 2


def test_a_hanging_reward_in_training_stops_the_run_with_a_clear_error(tmp_path, tiny_model_dir):
    cfg = _setup(tmp_path, model=tiny_model_dir, reward_funcs=["my_rewards.good", "my_rewards.slow"])
    started = time.monotonic()
    result = run_cli("train", str(cfg), cwd=tmp_path)
    assert time.monotonic() - started < 60
    assert result.returncode == 2
    assert ("grpokit: error: reward function 'slow' failed on 8 of 8 completions so far (0 errors, 8 timeouts), "
            "above reward_error_rate_limit=0.1; last: no result within reward_timeout=1s") in result.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "reward_errors.jsonl").read_text().splitlines()]
    assert len(records) == 8 and {r["kind"] for r in records} == {"timeout"} and records[0]["row"]["answer"]


def test_occasional_failures_below_the_limit_are_counted_and_the_run_goes_on(tmp_path, tiny_model_dir):
    cfg = _setup(tmp_path, model=tiny_model_dir, reward_funcs=["my_rewards.good", "my_rewards.fails_on_empty"],
                 reward_error_rate_limit=1.0, max_completion_length=1)
    result = run_cli("train", str(cfg), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [s for s in steps if "rewards/fails_on_empty/errors" in s]
    assert len(train) == 2 and all("rewards/good/mean" in s and "time/reward/good" in s for s in train)
    errors = sum(s["rewards/fails_on_empty/errors"] for s in train)
    logged = (tmp_path / "run" / "reward_errors.jsonl")
    assert errors == (len(logged.read_text().splitlines()) if logged.exists() else 0)


def test_a_reward_that_always_raises_stops_at_the_first_step(tmp_path, tiny_model_dir):
    cfg = _setup(tmp_path, model=tiny_model_dir, reward_funcs=["my_rewards.good", "my_rewards.always_fails"])
    result = run_cli("train", str(cfg), cwd=tmp_path)
    assert result.returncode == 2
    assert "reward function 'always_fails' failed on 8 of 8 completions so far (8 errors, 0 timeouts)" in result.stderr
    assert "KeyError: 'score'" in result.stderr and "Traceback" not in result.stderr
    assert "reward 'always_fails' failed on completion 0: KeyError" in result.stderr  # logged with the sample


def test_built_in_rewards_with_args_and_a_gate_train_through_the_cli(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
            for a in range(5) for b in range(4)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    config = {"model": str(tiny_model_dir), "dataset": "train.jsonl", "output_dir": "run", "num_generations": 4,
              "per_device_train_batch_size": 8, "max_completion_length": 8, "max_steps": 2, "device": "cpu",
              "reward_funcs": ["math_accuracy", {"func": "length", "args": {"min_length": 2, "max_length": 6},
                                                 "name": "short"},
                               "soft_overlong_punishment", {"func": "repetition_penalty", "args": {"ngram_size": 2}}],
              "reward_combination": "gated", "reward_gate": "short", "reward_gate_threshold": 0.5}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("train", "cfg.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for name in ("math_accuracy", "short", "soft_overlong_punishment", "repetition_penalty"):
        assert all(f"rewards/{name}/mean" in s and s[f"rewards/{name}/errors"] == 0.0 for s in steps), name
    assert all(s["rewards/math_accuracy/missing"] == 0.0 for s in steps)  # every GSM8K-style reference parsed
    assert not (tmp_path / "run" / "reward_errors.jsonl").exists()
