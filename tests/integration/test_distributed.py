"""Two CPU processes (torchrun, gloo) against one: the same global batch gives the same training.

Three prompts x 4 completions per generation, 6 rows per process: the second prompt's group straddles the two
processes. The model is float64 so that batching and the gradient all-reduce change only rounding (Llama's
RMSNorm still computes in float32, which bounds the agreement at ~1e-7 relative).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import write_jsonl

WORKER = Path(__file__).with_name("distributed_worker.py")
REWARDS = '''
def text_hash_reward(completions, **kwargs):
    return [sum(i * ord(ch) for i, ch in enumerate(c, 1)) % 997 / 997 for c in completions]
'''


def _config(tmp_path, tiny_model_dir, name, **overrides):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)}
                                           for a in range(5) for b in range(4)])
    write_jsonl(tmp_path / "held_out.jsonl", [{"prompt": f"What is {a} - {b}?", "answer": str(a - b)} for a, b in
                                              [(9, 1), (8, 3), (7, 7), (6, 2), (5, 4)]])
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    config = {"model": str(tiny_model_dir), "dataset": "train.jsonl", "output_dir": name,
              "reward_funcs": ["my_rewards.text_hash_reward"], "num_generations": 4, "max_completion_length": 8,
              "learning_rate": 1e-2, "max_steps": 3, "beta": 0.1, "seed": 3, "device": "cpu", "torch_dtype": "float64",
              "save_steps": None, **overrides}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env(tmp_path):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "GRPOKIT_CACHE": str(tmp_path / ".grpokit-cache"), "HF_HOME": str(tmp_path / ".hf-home"),
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), str(tmp_path)]), "OMP_NUM_THREADS": "1"}


def _run(tmp_path, processes: int, *args: str) -> subprocess.CompletedProcess:
    """The real CLI under the recording worker: alone, or in a torchrun job of `processes`."""
    records = tmp_path / f"records-{processes}"
    records.mkdir(exist_ok=True)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    done = subprocess.run([*launcher, str(WORKER), str(records), *args], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def _records(tmp_path, processes):
    return [torch.load(tmp_path / f"records-{processes}" / f"rank-{r}.pt") for r in range(processes)]


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_two_processes_train_as_one_on_the_same_global_batch(tmp_path, tiny_model_dir):
    # 5 prompts: 2 on process 0, 3 on process 1
    held_out = {"eval_dataset": "held_out.jsonl", "eval_steps": 2, "log_completions_steps": 1}
    one = _config(tmp_path, tiny_model_dir, "one", per_device_train_batch_size=12, save_steps=2, **held_out)
    two = _config(tmp_path, tiny_model_dir, "two", per_device_train_batch_size=6, save_steps=2,  # x 2 processes = 12
                  **held_out)
    _run(tmp_path, 1, "train", str(one))
    done = _run(tmp_path, 2, "train", str(two))
    [single], ranks = _records(tmp_path, 1), _records(tmp_path, 2)

    # parameters identical across processes after every step
    assert len(ranks[0]["params"]) == len(ranks[1]["params"]) == 3
    for step, (a, b) in enumerate(zip(ranks[0]["params"], ranks[1]["params"], strict=True), 1):
        assert torch.equal(a, b), f"step {step}: the processes' parameters differ by {(a - b).abs().max():.3g}"
    # the same completions and rewards: each process sampled its rows with the streams one process gives them
    for gen in range(3):
        assert ranks[0]["completions"][gen] == ranks[1]["completions"][gen] == single["completions"][gen]
        assert torch.equal(ranks[0]["rewards"][gen], single["rewards"][gen])
        # rows 0-5 on process 0 and 6-11 on process 1: the group of rows 4-7 is split, its advantages are one group's
        both = torch.cat([ranks[0]["advantages"][gen], ranks[1]["advantages"][gen]])
        torch.testing.assert_close(both, single["advantages"][gen], rtol=0, atol=1e-12)
        assert len(ranks[0]["advantages"][gen]) == 6
    # training equal to one process over the same 12 completions per step: loss, gradient norm, weights
    m1, m2 = _metrics(tmp_path / "one" / "metrics.jsonl"), _metrics(tmp_path / "two" / "metrics.jsonl")
    train_keys = ("loss", "grad_norm", "kl", "reward", "entropy", "completions/mean_length", "num_tokens")
    eval_keys = ("eval/accuracy", "eval/num_prompts", "eval/completions/mean_length")
    assert [("loss" in m, "eval/accuracy" in m) for m in m1] == [("loss" in m, "eval/accuracy" in m) for m in m2]
    assert sum("eval/accuracy" in m for m in m1) == 2  # at step 2 and after training
    for a, b in zip(m1, m2, strict=True):
        for key in train_keys if "loss" in a else eval_keys:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
    for step, (a, b) in enumerate(zip(single["params"], ranks[0]["params"], strict=True), 1):
        assert (a - b).abs().max() < 1e-5, f"step {step}: two processes vs one differ by {(a - b).abs().max():.3g}"
    final_one, final_two = load_file(tmp_path / "one/final_model/model.safetensors"), load_file(
        tmp_path / "two/final_model/model.safetensors")
    assert max((final_one[k] - final_two[k]).abs().max() for k in final_one) < 1e-5
    # the main process alone writes and speaks
    assert ranks[1]["writes"] == [] and set(ranks[0]["writes"]) == {"log_completions", "save", "save_model"}
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert done.stdout.count("step 3/3") == 1 and done.stdout.count("saved two/final_model") == 1

    # one process's checkpoint resumed by two: each step would train on twice the completions -> refused, exit 2
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "grpokit", "train", str(one), "--resume", "one/checkpoint-2"], cwd=tmp_path,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "exitcode  : 2" in done.stderr, done.stderr[-3000:]  # each process exits 2
    assert "written by a run of 1 process(es), this one has 2" in done.stderr


@pytest.mark.slow
def test_two_processes_resume_mid_generation_exactly(tmp_path, tiny_model_dir):
    """Two optimizer steps per generation; resumed after the first, each process gets its own unused micro-batches."""
    cfg = _config(tmp_path, tiny_model_dir, "run", per_device_train_batch_size=6, steps_per_generation=2, max_steps=4,
                  save_steps=1)
    _run(tmp_path, 2, "train", str(cfg))
    (tmp_path / "run" / "final_model").rename(tmp_path / "straight")
    for later in ("checkpoint-2", "checkpoint-3"):
        (tmp_path / "run" / later).rename(tmp_path / f"straight-{later}")
    _run(tmp_path, 2, "train", str(cfg), "--resume", "run/checkpoint-1")
    a, b = load_file(tmp_path / "straight/model.safetensors"), load_file(tmp_path / "run/final_model/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_a_process_that_fails_stops_the_job_with_each_error_said_once(tmp_path, tiny_model_dir):
    """Process 1's reward function always fails: it stops with the reward error; process 0, waiting in the
    generation's gather, stops at once with one line that points at it (no hang, no traceback)."""
    (tmp_path / "failing_rewards.py").write_text(
        "import os\n"
        "def fails_on_process_1(completions, **kwargs):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        raise RuntimeError('process 1 cannot score')\n"
        "    return [0.5] * len(completions)\n")
    config = _config(tmp_path, tiny_model_dir, "failing",
                     reward_funcs=["my_rewards.text_hash_reward", "failing_rewards.fails_on_process_1"])
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "grpokit", "train", str(config)], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=180)
    err = done.stderr
    assert done.returncode != 0
    assert "grpokit: error: reward function 'fails_on_process_1' failed on 8 of 8 completions" in err, err[-3000:]
    assert ("grpokit: error: process 0 of 2 stopped: another process of this job left a collective operation"
            in err), err[-3000:]
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err, err[-3000:]
    assert (tmp_path / "failing" / "reward_errors.rank1.jsonl").exists()
