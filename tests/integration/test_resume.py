"""Checkpoints and exact resume through the real CLI on a tiny model: N steps + resume + N steps == 2N steps."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import run_cli, write_jsonl

REWARDS = '''
def text_hash_reward(completions, **kwargs):
    return [sum(i * ord(ch) for i, ch in enumerate(c, 1)) % 997 / 997 for c in completions]
'''
# differ between two runs of the same config whatever happens
_VOLATILE = ("time/", "step_time", "tokens_per_second", "eval/time", "timestamp")


def _setup(tmp_path, tiny_model_dir, name="cfg.yaml", rows=20, **overrides):
    data = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(5) for b in range(4)][:rows]
    write_jsonl(tmp_path / "train.jsonl", data)
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    config = {"model": str(tiny_model_dir), "dataset": "train.jsonl", "output_dir": "run",
              "reward_funcs": ["my_rewards.text_hash_reward"], "num_generations": 4, "per_device_train_batch_size": 4,
              "max_completion_length": 8, "learning_rate": 1e-2, "lr_scheduler_type": "linear", "max_steps": 6,
              "save_steps": 3, "beta": 0.1, "seed": 3, "device": "cpu", **overrides}
    if "num_train_epochs" in overrides:
        del config["max_steps"]
    (tmp_path / name).write_text(yaml.safe_dump(config))
    return tmp_path / name


def _metrics(path):
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith(_VOLATILE)} for m in lines]


def _weights(directory):
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and wa
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"weights differ after resume: {different}"


def _straight_and_resumed(tmp_path, tiny_model_dir, resume_at, **overrides):
    """Run `run` straight through (writing checkpoints), then resume `resume_at` into `resumed`."""
    cfg = _setup(tmp_path, tiny_model_dir, **overrides)
    straight = run_cli("train", str(cfg), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    checkpoint = tmp_path / "run" / f"checkpoint-{resume_at}"
    assert (checkpoint / "trainer_state.json").is_file()
    resumed = run_cli("train", str(cfg), "--resume", str(checkpoint), "--set", "output_dir=resumed", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {checkpoint} at step {resume_at}" in resumed.stdout
    return tmp_path / "run", tmp_path / "resumed"


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_resume_mid_generation_equals_a_straight_run(tmp_path, tiny_model_dir):
    # 2 micro-batches per generation x 2 iterations = 4 optimizer steps per generation: checkpoint-3 falls inside
    # the first generation, with one window still to run on its saved completions and old/reference log-probs
    run, resumed = _straight_and_resumed(tmp_path, tiny_model_dir, 3, num_iterations=2, steps_per_generation=2,
                                         max_steps=8, save_steps=3)
    _assert_same_weights(run / "final_model", resumed / "final_model")
    straight = _metrics(run / "metrics.jsonl")
    assert [m["step"] for m in straight] == list(range(1, 9))
    assert _metrics(resumed / "metrics.jsonl") == [m for m in straight if m["step"] > 3]
    state = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and (run / "checkpoint-3" / "pending.pt").is_file()
    health = state["health"]  # the monitor's windows: a resumed run alerts as this one (tests/unit/test_alerts.py)
    assert [m["reward"] for m in straight[:3]] == health["recent"]["reward"] == health["early"]["reward"]
    # the run-long counts behind reward_error_rate_limit (tests/unit/test_rewards.py)
    counts = state["rewards"]["stats"]
    assert counts and all(c["scored"] > 0 and c["failures"] == 0 for c in counts.values()), counts
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pt", "config.yaml", "model.safetensors", "config.json"):
        assert (run / "checkpoint-3" / name).is_file(), name


@pytest.mark.slow  # 8 + 4 steps; the default suite resumes mid-generation and mid-epoch elsewhere in this file
def test_resume_at_an_epoch_boundary_runs_the_remaining_steps(tmp_path, tiny_model_dir):
    # 4 prompts, 1 prompt per generation: an epoch is 4 steps; 2 epochs = 8 steps; checkpoint-4 ends epoch 1
    run, resumed = _straight_and_resumed(tmp_path, tiny_model_dir, 4, rows=4, num_train_epochs=2,
                                         save_steps=4, per_device_train_batch_size=4, beta=0.0)
    resumed_steps = [m["step"] for m in _metrics(resumed / "metrics.jsonl")]
    assert resumed_steps == [5, 6, 7, 8], "a resume at an epoch boundary must run the second epoch"
    _assert_same_weights(run / "final_model", resumed / "final_model")


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_resume_with_lora_restores_the_adapter(tmp_path, tiny_model_dir):
    run, resumed = _straight_and_resumed(tmp_path, tiny_model_dir, 2, use_peft=True, lora_r=4, lora_alpha=8,
                                         lora_target_modules=["q_proj", "v_proj"], max_steps=4, save_steps=2)
    assert (run / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert not (run / "checkpoint-2" / "model.safetensors").exists()
    _assert_same_weights(run / "final_model", resumed / "final_model")


def test_save_total_limit_keeps_the_newest(tmp_path, tiny_model_dir):
    cfg = _setup(tmp_path, tiny_model_dir, max_steps=5, save_steps=1, save_total_limit=2, beta=0.0)
    result = run_cli("train", str(cfg), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "run").glob("*checkpoint*")) == ["checkpoint-3", "checkpoint-4"]


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_resume_with_a_changed_setting_is_an_error_unless_forced(tmp_path, tiny_model_dir):
    cfg = _setup(tmp_path, tiny_model_dir, max_steps=2, save_steps=1, beta=0.0)
    assert run_cli("train", str(cfg), cwd=tmp_path).returncode == 0
    refused = run_cli("train", str(cfg), "--resume", "--set", "learning_rate=0.5", cwd=tmp_path)
    assert refused.returncode == 2
    assert "learning_rate: 0.01 -> 0.5" in refused.stderr and "--force" in refused.stderr
    # output_dir, logging and save settings do not change results: no --force needed
    neutral = run_cli("train", str(cfg), "--resume", str(tmp_path / "run" / "checkpoint-1"), "--set",
                      "output_dir=other", "--set", "logging_steps=5", cwd=tmp_path)
    assert neutral.returncode == 0, neutral.stderr
    forced = run_cli("train", str(cfg), "--resume", "--force", "--set", "learning_rate=0.5", "--set", "max_steps=3",
                     cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert [m["step"] for m in _metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_resume_without_a_checkpoint_says_so(tmp_path, tiny_model_dir):
    cfg = _setup(tmp_path, tiny_model_dir)
    result = run_cli("train", str(cfg), "--resume", cwd=tmp_path)
    assert result.returncode == 2 and "no checkpoint in run" in result.stderr
    result = run_cli("train", str(cfg), "--resume", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "not a complete grpokit checkpoint" in result.stderr
    damaged = tmp_path / "run" / "checkpoint-1"
    damaged.mkdir(parents=True)
    (damaged / "trainer_state.json").write_text("{}")
    (damaged / "optimizer.pt").write_bytes(b"not a torch file")
    result = run_cli("train", str(cfg), "--resume", cwd=tmp_path)
    assert result.returncode == 2 and "cannot read optimizer.pt" in result.stderr, result.stderr


KILL_DURING_SAVE = '''
import os, signal, sys
import torch
real_save = torch.save
def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if ".checkpoint-4.tmp" in str(f) and str(f).endswith("optimizer.pt"):
        os.kill(os.getpid(), signal.SIGKILL)  # mid-write: model and optimizer written, the rest not
torch.save = save
from grpokit.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _env(tmp_path):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "GRPOKIT_CACHE": str(tmp_path / ".cache")}


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_kill_during_a_checkpoint_write_leaves_the_previous_one_resumable(tmp_path, tiny_model_dir):
    cfg = _setup(tmp_path, tiny_model_dir, max_steps=6, save_steps=2, beta=0.0)
    (tmp_path / "killer.py").write_text(KILL_DURING_SAVE)
    with open(tmp_path / "out.txt", "w") as out:
        killed = subprocess.run([sys.executable, "killer.py", "train", str(cfg)], cwd=tmp_path, env=_env(tmp_path),
                                stdout=out, stderr=subprocess.STDOUT, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    run = tmp_path / "run"
    assert (run / ".checkpoint-4.tmp").is_dir() and not (run / "checkpoint-4").exists()
    resumed = run_cli("train", str(cfg), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 2 of 6" in resumed.stdout
    assert not (run / ".checkpoint-4.tmp").exists(), "the half-written checkpoint is cleaned up"
    assert [m["step"] for m in _metrics(run / "metrics.jsonl")] == list(range(1, 7))
    # and the result is the uninterrupted run's
    straight = run_cli("train", str(cfg), "--set", "output_dir=straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    _assert_same_weights(tmp_path / "straight" / "final_model", run / "final_model")


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_writes_a_checkpoint_and_names_it(tmp_path, tiny_model_dir, sig):
    cfg = _setup(tmp_path, tiny_model_dir, max_steps=10_000, save_steps=None, beta=0.0)
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "grpokit", "train", str(cfg)], cwd=tmp_path, env=_env(tmp_path),
                                stdout=out, stderr=subprocess.STDOUT)
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()
            time.sleep(0.1)
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    text = (tmp_path / "out.txt").read_text()
    assert rc == 128 + sig, text
    saved = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert len(saved) == 1, text
    assert f"checkpoint written to {saved[0].relative_to(tmp_path)}" in text and "--resume" in text
    step = json.loads((saved[0] / "trainer_state.json").read_text())["global_step"]
    assert saved[0].name == f"checkpoint-{step}" and step >= 2
    resumed = run_cli("train", str(cfg), "--resume", "--force", "--set", f"max_steps={step + 1}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {step} of {step + 1}" in resumed.stdout


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_max_train_seconds_ends_the_run_at_a_step_end_and_resume_goes_on(tmp_path, tiny_model_dir):
    """A budget smaller than one step: the run ends after step 1 as a run ends at max_steps (final_model), plus a
    checkpoint; resumed without the budget it runs the other steps and equals a run that never had one."""
    cfg = _setup(tmp_path, tiny_model_dir, max_steps=4, save_steps=100, beta=0.0)
    straight = run_cli("train", str(cfg), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    budget = run_cli("train", str(cfg), "--set", "output_dir=budget", "--set", "max_train_seconds=0.001", cwd=tmp_path)
    assert budget.returncode == 0, budget.stderr
    run = tmp_path / "budget"
    assert "max_train_seconds 0.001 reached (" in budget.stdout and "the run ends after step 1 of 4" in budget.stdout
    assert [m["step"] for m in _metrics(run / "metrics.jsonl")] == [1]
    assert (run / "final_model" / "model.safetensors").is_file()
    state = json.loads((run / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and 0 < state["train_seconds"] < 600, state["train_seconds"]
    again = run_cli("train", str(cfg), "--set", "output_dir=budget", "--set", "max_train_seconds=0.001", "--resume",
                    cwd=tmp_path)  # the same budget: spent already, so not one more step
    assert again.returncode == 0, again.stderr
    assert "max_train_seconds 0.001 already spent" in again.stdout
    assert [m["step"] for m in _metrics(run / "metrics.jsonl")] == [1]
    resumed = run_cli("train", str(cfg), "--set", "output_dir=budget", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert [m["step"] for m in _metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]
    _assert_same_weights(tmp_path / "run" / "final_model", run / "final_model")


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_a_resumed_run_keeps_the_bf16_its_checkpoint_settled(tmp_path, tiny_model_dir):
    # the run starts with bf16 explicitly the opposite of what `auto` settles on this machine; resumed under auto
    # (the default), it keeps the checkpoint's precision, and so ends where the straight run ends
    from grpokit.runtime import bf16_unsupported

    here = bf16_unsupported("cpu") is None
    cfg = _setup(tmp_path, tiny_model_dir, bf16=not here, max_steps=4, save_steps=2)
    straight = run_cli("train", str(cfg), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    checkpoint = tmp_path / "run" / "checkpoint-2"
    resumed = run_cli("train", str(cfg), "--resume", str(checkpoint), "--set", "output_dir=resumed",
                      "--set", "bf16=auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    on_off = {True: "on", False: "off"}
    assert (f"bf16: auto -> {on_off[not here]}, as the run in {checkpoint} settled it; this machine would settle "
            f"{on_off[here]}") in resumed.stdout + resumed.stderr
    assert yaml.safe_load((tmp_path / "resumed" / "config.yaml").read_text())["bf16"] is (not here)
    _assert_same_weights(tmp_path / "run" / "final_model", tmp_path / "resumed" / "final_model")
