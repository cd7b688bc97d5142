"""Completion logs and the start-of-run summary's batch accounting."""

from __future__ import annotations

import json
import math

import pytest
import torch

from grpokit.config import validate_config
from grpokit.observe import runlog


def test_log_completions_writes_one_line_per_completion(tmp_path):
    echoed = []
    chat = [{"role": "user", "content": "What is 2+2?"}]
    long_completion = "think " * 200 + "4"
    path = runlog.log_completions(
        tmp_path, 3, prompts=["1+1?", "1+1?", chat, chat], completions=["2", "3", long_completion, "5"],
        reward_names=["correct", "format"], rewards=torch.tensor([[1.0, 0.5], [0.0, math.nan], [1.0, 1.0], [0.0, 0.0]]),
        advantages=torch.tensor([0.7071, -0.7071, 1.0, -1.0]), finish_reasons=["stop", "stop", "length", "stop"],
        echo=echoed.append, total_rewards=torch.tensor([1.5, math.nan, 2.0, 0.0]))
    assert path == tmp_path / "completions" / "step_3.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 4
    assert lines[1] == {"step": 3, "prompt": "1+1?", "completion": "3", "rewards": {"correct": 0.0, "format": None},
                        "total_reward": None, "advantage": pytest.approx(-0.7071), "finish_reason": "stop"}
    assert lines[2]["prompt"] == chat and lines[2]["completion"] == long_completion
    assert lines[2]["finish_reason"] == "length" and lines[2]["advantage"] == 1.0 and lines[2]["total_reward"] == 2.0
    assert len(echoed) == 1
    assert "sample at step 3" in echoed[0] and "correct=1, format=0.5" in echoed[0] and "advantage +0.707" in echoed[0]


def test_log_completions_echo_is_truncated_and_shows_chat_and_na(tmp_path):
    echoed = []
    runlog.log_completions(tmp_path, 1, [[{"role": "user", "content": "hi"}]], ["x" * 1000], ["correct"],
                           [[math.nan]], [0.0], ["length"], echo=echoed.append)
    text = echoed[0]
    assert "user: hi" in text and "correct=n/a" in text and "finished by length" in text
    assert "x" * runlog.SAMPLE_CHARS in text and "x" * (runlog.SAMPLE_CHARS + 1) not in text
    assert "700 more chars" in text
    line = json.loads((tmp_path / "completions" / "step_1.jsonl").read_text())
    assert line["rewards"] == {"correct": None} and "total_reward" not in line


def test_log_completions_lengths_must_line_up(tmp_path):
    with pytest.raises(ValueError):
        runlog.log_completions(tmp_path, 1, ["p", "p"], ["a"], ["r"], [[1.0], [0.0]], [0.0, 0.0], ["stop", "stop"],
                               echo=None)


def _summary(**overrides) -> list[str]:
    cfg = validate_config({"num_generations": 4, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2,
                           "steps_per_generation": 4, "num_iterations": 2, "max_prompt_length": 100,
                           "max_completion_length": 50, "max_steps": 8, "save_steps": None, **overrides})
    policy = torch.nn.Linear(4, 3)
    policy.bias.requires_grad_(False)
    return runlog.summary_lines(cfg, policy, device="cpu", train_prompts=10, eval_prompts=3)


def test_summary_batch_accounting():
    said = _summary(loss_type="dr_grpo")
    text = "\n".join(said)
    assert "12 trainable of 15 parameters (80.0%)" in text
    assert "10 train prompts, 3 held-out; 8 optimizer steps = 2 generation(s) of 8 prompts = 1.60 epoch(s)" in text
    # 8 prompts x 4 = 32 completions in 4 micro-batches of 8; 2 per optimizer step; 2 iterations x 2 steps per pass
    assert ("per generation: 8 prompts x 4 completions = 32 completions in 4 micro-batch(es) of 8; per optimizer step: "
            "2 micro-batch(es) = 16 completions (4 prompts); 4 optimizer step(s) per generation "
            "(num_iterations 2 x 2 step(s) per pass)") in text
    assert "each generation is used for 4 optimizer steps; the last uses a policy 3 update(s) old" in text
    assert "(16 completions x max_completion_length 50) = 800, a constant" in text
    assert ("at most 4,800 per generation (8 prompts x 4 x (100 + 50)), 2,400 per optimizer step, "
            "1,200 per micro-batch") in text


@pytest.mark.parametrize(("loss_type", "expected"), [
    ("grpo", "mean over each completion's tokens, then the mean over the 8 completions of the step"),
    ("bnpo", "the completion tokens in the step (this process's 8 completions; averaged over processes)"),
    ("dapo", "the completion tokens in the step (all 8 completions, over every process)"),
])
def test_summary_on_policy_and_loss_normalisers(loss_type, expected):
    said = _summary(loss_type=loss_type, steps_per_generation=None, num_iterations=1, gradient_accumulation_steps=1,
                    max_prompt_length=None)
    text = "\n".join(said)
    assert "on-policy: each generation is used for 1 optimizer step" in text
    assert f"loss_type {loss_type}: loss = " in text and expected in text
    assert "prompts unbounded (max_prompt_length none) + at most 50 per completion" in text


def test_summary_counts_every_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    said = _summary(loss_type="dapo", steps_per_generation=None, num_iterations=1, gradient_accumulation_steps=1,
                    max_prompt_length=None)
    text = "\n".join(said)
    assert "= 16 completions in 1 micro-batch(es) of 8 in each of 2 processes" in text
    assert "per optimizer step: 1 micro-batch(es) in each of 2 processes = 16 completions (4 prompts)" in text
    assert "(all 16 completions, over every process)" in text


def test_summary_says_the_precision_and_why_auto_chose_it(monkeypatch):
    from grpokit import runtime

    assert _summary(bf16=True)[0].endswith("on cpu (bf16 autocast)")
    assert _summary(bf16=False)[0].endswith("on cpu")
    assert _summary(bf16="auto")[0].endswith("on cpu")  # not settled yet: says nothing it does not know
    policy = torch.nn.Linear(4, 3)
    for why in (None, "the CPU has no avx512_bf16 or AMX bf16 instructions"):
        monkeypatch.setattr(runtime, "bf16_unsupported", lambda device, why=why: why)
        cfg = validate_config({"device": "cpu"}).settle_auto()
        line = runlog.summary_lines(cfg, policy, device="cpu", train_prompts=10, eval_prompts=None)[0]
        assert line.endswith(f"on cpu ({runlog.precision(cfg)})")
        assert runlog.precision(cfg) == ("bf16: auto -> on: the device computes bf16 natively (autocast; float32 "
                                         "master weights)" if why is None else
                                         f"bf16: auto -> off: {why}; the run computes in float32")
