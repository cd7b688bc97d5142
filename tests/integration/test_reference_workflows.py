"""The reference workflows (../shared/reference/) as their users write them, through the real CLI on the tiny model.

Each test runs the reference's own config keys or reward signatures (only the import or command name changed) and
checks what the reference promises: the metric logged, the setting kept, the reward bound as written.
"""

import json

import pytest
import yaml

from tests.conftest import run_cli, write_jsonl

# reference 001 (training-wizard): a RewardSpec subclass with settings from its [[reward_specs]] table, a
# compute_reward(self, prompts, completions, **kwargs) and metrics of its own
GEC_SPEC = '''
from grpokit import RewardSpec


def _edits(source, text):
    a, b = source.split(), text.split()
    return {(i, w) for i, w in enumerate(b) if i >= len(a) or a[i] != w} | {(i, None) for i in range(len(b), len(a))}


class GECExampleRewardSpec(RewardSpec):
    def __init__(self, beta=1.0):
        self.beta = beta

    def compute_reward(self, prompts, completions, **kwargs):
        rewards, precisions, recalls = [], [], []
        for source, hypothesis, target in zip(kwargs["source"], completions, kwargs["target"]):
            hyp, ref = _edits(source, hypothesis), _edits(source, target)
            tp = len(hyp & ref)
            p = tp / len(hyp) if hyp else float(not ref)
            r = tp / len(ref) if ref else 1.0
            b2 = self.beta ** 2
            rewards.append((1 + b2) * p * r / (b2 * p + r) if p + r else 0.0)
            precisions.append(p)
            recalls.append(r)
        self.log_metrics({"precision": sum(precisions) / len(precisions), "recall": sum(recalls) / len(recalls)})
        return rewards
'''

WIZARD_TOML = '''
recipe_class = "training_wizard.recipes.grpo.GRPORecipe"
model = "{model}"
dataset = "gec.jsonl"
output_dir = "run"
sample_rate = 100
gradient_checkpointing = true
per_device_train_batch_size = 4
gradient_accumulation_steps = 1
beta = 0.0
epsilon = 0.2
num_generations = 2
temperature = 1.0
num_iterations = 1
max_prompt_length = 64
max_completion_length = 8
max_steps = 2
use_vllm = false
vllm_gpu_memory_utilization = 0.8
vllm_max_model_len = 4096
vllm_dtype = "bfloat16"
vllm_enable_prefix_caching = true

[[reward_specs]]
spec_class = "gec_spec.GECExampleRewardSpec"
weight = 1.0
beta = 0.5
'''


def _gec_rows():
    pairs = [("she go home", "she goes home"), ("they is here", "they are here"), ("he have a cat", "he has a cat"),
             ("we was late", "we were late")]
    return [{"prompt": f"Correct: {s}", "source": s, "target": t} for s, t in pairs]


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_001_a_reward_spec_subclass_trains_and_logs_its_metrics(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "gec.jsonl", _gec_rows())
    (tmp_path / "gec_spec.py").write_text(GEC_SPEC)
    (tmp_path / "config.toml").write_text(WIZARD_TOML.format(model=tiny_model_dir))
    dry = run_cli("train", "config.toml", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "reward 'GECExampleRewardSpec' (GECExampleRewardSpec instance" not in dry.stdout  # not a __call__ object
    assert "reward 'GECExampleRewardSpec' (compute_reward object, killable worker)" in dry.stdout
    result = run_cli("train", "config.toml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "rewards/GECExampleRewardSpec/mean" in line]
    assert len(steps) == 2
    for line in steps:  # the spec's own metrics, at every step, as rewards/<spec name>/<key>
        assert 0.0 <= line["rewards/GECExampleRewardSpec/precision"] <= 1.0
        assert 0.0 <= line["rewards/GECExampleRewardSpec/recall"] <= 1.0
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["vllm_dtype"] == "bfloat16" and recorded["vllm_enable_prefix_caching"] is True
    assert recorded["reward_funcs"][0]["args"] == {"beta": 0.5}


BROKEN = '''
def _score(completion):
    return float(len(completion))


def positional(prompts, completions, **kwargs):
    return [_score(c, prompts) for c in completions]  # TypeError on every call


def only_short(completions, **kwargs):
    return [1.0 / len(c) for c in completions]  # fails on an empty completion only
'''


def _arith(tmp_path, model, funcs):
    rows = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(4) for b in range(3)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "broken.py").write_text(BROKEN)
    config = {"model": str(model), "dataset": "train.jsonl", "output_dir": "run", "num_generations": 2,
              "per_device_train_batch_size": 2, "max_completion_length": 8, "max_steps": 1, "reward_funcs": funcs}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))


def test_dry_run_calls_every_reward_and_fails_on_one_that_cannot_be_called(tmp_path):
    _arith(tmp_path, "nobody/not-downloaded", ["number_correct", "broken.positional"])  # never loaded: a hub id
    result = run_cli("train", "cfg.yaml", "--dry-run", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "FAIL reference answer (answer): 2 of 2 failed" in result.stdout
    assert "TypeError: _score() takes 1 positional argument but 2 were given" in result.stdout
    assert "fix: rewards are called with keyword arguments bound by parameter name" in result.stdout
    assert "dry run: reward(s) ['positional'] failed on each kind of probe completion" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_dry_run_warns_of_a_reward_that_fails_on_some_completions_only(tmp_path):
    _arith(tmp_path, "nobody/not-downloaded", ["broken.only_short"])
    result = run_cli("train", "cfg.yaml", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL empty completion: 2 of 2 failed: error on completion 0: ZeroDivisionError" in result.stdout
    assert "dry run: 1 reward call(s) failed on some probe completions" in result.stderr
    assert "nothing trained" in result.stdout


REFERENCE_004 = '''
def reward(generated, ground_truth):
    return 1.0 if generated == ground_truth else 0.0


def code_reward(generated_code, test_cases):
    passed = sum(1 for t in test_cases if t in generated_code)
    return passed / len(test_cases)
'''


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_004_the_guides_own_reward_signatures_train_without_a_decorator(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Write {w}", "ground_truth": w, "tests": [w, w[:2]]} for w in ("abc", "de", "fgh", "ij")]
    write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "my_rewards.py").write_text(REFERENCE_004)
    config = {"model": str(tiny_model_dir), "dataset": "train.jsonl", "output_dir": "run", "num_generations": 2,
              "per_device_train_batch_size": 4, "max_completion_length": 6, "max_steps": 1,
              "reward_funcs": ["my_rewards.reward", "my_rewards.code_reward"]}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    check = run_cli("check", "cfg.yaml", "--quiet-config", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "reward 'reward' (function, per-sample, killable worker)" in check.stdout
    assert "reward 'code_reward' (function, per-sample, killable worker)" in check.stdout
    result = run_cli("train", "cfg.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["rewards/reward/missing"] == 0.0 and line["rewards/code_reward/missing"] == 0.0


# reference 000 (Axolotl): `datasets: [{path:, type: module.fn}]` with the transform and reward written as there
AXOLOTL_MODULE = '''
from typing import Dict, List


def transform_fn(example, tokenizer=None):
    return {
        "prompt": [
            {"role": "user", "content": example["question"]},
        ],
        "answer": example["reference_answer"]  # Optional
    }


def evaluate_response(completion, label):
    return 1.0 if label in str(completion) else 0.1


def my_reward_func(
    prompts: List[str],
    completions: List[str],
    labels: List[str],
    context: Dict = None,
) -> List[float]:
    return [evaluate_response(c, label) for c, label in zip(completions, labels)]
'''

AXOLOTL_YAML = '''
rl: grpo
base_model: {model}
datasets:
  - path: qa.jsonl
    type: axo_module.transform_fn
trl:
  beta: 0.001
  max_completion_length: 8
  num_generations: 2
  use_vllm: false
  reward_funcs: [axo_module.my_reward_func]
vllm:
  host: 0.0.0.0
  port: 8000
  tensor_parallel_size: 1
  gpu_memory_utilization: 0.7
  max_model_len: 800
learning_rate: 1.0e-6
gradient_accumulation_steps: 1
micro_batch_size: 2
max_steps: 1
output_dir: run
'''


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_000_an_axolotl_dataset_type_is_applied_as_the_transform(tmp_path, tiny_model_dir):
    rows = [{"question": f"What is {a} + 1?", "reference_answer": str(a + 1)} for a in range(6)]
    write_jsonl(tmp_path / "qa.jsonl", rows)  # no prompt column: only the transform makes one
    (tmp_path / "axo_module.py").write_text(AXOLOTL_MODULE)
    (tmp_path / "axolotl.yaml").write_text(AXOLOTL_YAML.format(model=tiny_model_dir))
    dry = run_cli("train", "axolotl.yaml", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "datasets[0].type 'axo_module.transform_fn' is applied to each row as `transform`" in dry.stdout
    assert "transform: axo_module.transform_fn" in dry.stdout
    assert "chat prompts" in dry.stdout and "columns: answer, prompt" in dry.stdout, dry.stdout
    assert "reference answer (answer)" in dry.stdout and "[1, 1]" in dry.stdout  # labels: the transformed answer
    result = run_cli("train", "axolotl.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["transform"] == "axo_module.transform_fn"


def test_003_004_sft_takes_the_math_qa_options_its_own_batch_and_the_worked_solution(tmp_path, tiny_model_dir):
    """Reference 003's `sft --config PRESET --model-name --train-data --output-dir`, with a batch no GRPO rule allows
    (3 rows, fast_test's 2 samples per question), on gsm8k-style rows (reference 004): the worked `solution` is
    trained on, not the bare final `answer`, and the summary says so."""
    rows = [{"question": f"Tom has {a} apples and buys {b}. How many now?", "answer": str(a + b),
             "solution": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"} for a in range(3) for b in range(3)]
    write_jsonl(tmp_path / "gsm.jsonl", rows)
    result = run_cli("sft", "--config", "fast_test", "--model-name", str(tiny_model_dir), "--train-data", "gsm.jsonl",
                     "--output-dir", "sft_out", "--batch-size", "3", "--set", "max_steps=2",
                     "--set", "max_completion_length=32", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trained on column 'solution'" in result.stdout
    assert "load_in_4bit: auto -> off: `grpokit sft` trains and merges full-precision weights" in result.stdout
    recorded = yaml.safe_load((tmp_path / "sft_out" / "config.yaml").read_text())
    assert recorded["per_device_train_batch_size"] == 3 and recorded["num_generations"] == 2
    assert recorded["dataset"] == "gsm.jsonl" and recorded["use_peft"] is True and recorded["load_in_4bit"] is False
    assert (tmp_path / "sft_out" / "final_model" / "config.json").exists()


def test_003_command_lines_as_written_score_free_text_answers_and_name_a_missing_sft_model(tmp_path, tiny_model_dir):
    """Reference 003's GRPO commands on its data format (question, free-text answer, source). Without
    --reward-model its default, the heuristic reward model, scores the answers (a reward that found no number in
    them would give every completion None: no signal), with its default KL 0.1. Its from-SFT command names
    `output/sft/final_model`: where that directory does not exist, the dry run says so, as the run would."""
    rows = [{"question": q, "answer": a, "source": "Leon-Garcia Chapter 2.4"} for q, a in [
        ("What is conditional probability?", "Conditional probability is the probability of A given B, P(A|B) = "
                                             "P(A and B) / P(B)."),
        ("What is a random variable?", "A random variable maps each outcome of an experiment to a number."),
        ("State Bayes' rule.", "P(A|B) = P(B|A) P(A) / P(B), for P(B) > 0.")]]
    (tmp_path / "grpo_train.json").write_text(json.dumps(rows))
    for preset in ("default", "fast_test"):
        result = run_cli("train", "--config", preset, "--model-name", str(tiny_model_dir), "--train-data",
                         "grpo_train.json", "--dry-run", cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "reward_funcs:\n- heuristic_math_qa" in result.stdout and "beta: 0.1" in result.stdout
        probe = result.stdout[result.stdout.index("reward 'heuristic_math_qa'"):]
        reference = probe.splitlines()[1]
        assert reference.startswith("  reference answer (answer)") and "None" not in reference, probe
    for command in (["train", "--dry-run"], ["train"]):
        result = run_cli(*command, "--config", "from_sft", "--sft-model", "output/sft/final_model",
                         "--train-data", "grpo_train.json", cwd=tmp_path)
        assert result.returncode == 2, result.stdout + result.stderr
        assert ("model: directory 'output/sft/final_model' does not exist (read as a path: a hub id is 'name' or "
                "'namespace/name'). `grpokit sft` writes its model to OUTPUT_DIR/final_model") in result.stderr
        assert "Traceback" not in result.stderr and "Repo id" not in result.stderr
    result = run_cli("check", "--preset", "from_sft", "--set", "sft_model=output/sft/final_model", "--set",
                     "dataset=grpo_train.json", "--quiet-config", cwd=tmp_path)
    assert result.returncode == 1 and "FAIL model: directory 'output/sft/final_model' does not exist" in result.stdout


def test_003_grpo_trainer_with_config_and_a_reward_model_subclass(tmp_path, tiny_model_dir, monkeypatch):
    """Reference 003's Python snippet, as written there but for the import: `class MyRewardModel(RewardModel)` with
    compute_reward(self, questions, answers, references) returning a tensor, and GRPOTrainer(config=config,
    reward_model=MyRewardModel()) with the config from a preset naming the model and the data."""
    import torch

    from grpokit import GRPOTrainer, RewardModel
    from grpokit.config import load_config

    def my_scoring_function(q, a, r):  # strings only: a question, the model's answer, the reference
        assert q.startswith("What is") and isinstance(a, str) and r.isdigit(), (q, a, r)
        return 1.0 if r in a else 0.0

    class MyRewardModel(RewardModel):
        def compute_reward(self, questions, answers, references):
            # Your custom logic here
            rewards = []
            for q, a, r in zip(questions, answers, references):
                reward = my_scoring_function(q, a, r)
                rewards.append(reward)
            return torch.tensor(rewards)

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "qa.jsonl", [{"question": f"What is {a} + 2?", "answer": str(a + 2)} for a in range(4)])
    config = load_config(None, ["max_steps=2", "max_completion_length=6", "report_to=none"], preset="fast_test",
                         cli={"model": str(tiny_model_dir), "dataset": "qa.jsonl", "output_dir": "out"})
    trainer = GRPOTrainer(config=config, reward_model=MyRewardModel())
    output = trainer.train()
    assert output.global_step == 2 and trainer.config.use_peft is True  # fast_test's LoRA
    steps = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in steps if "rewards/MyRewardModel/mean" in line]
    assert [line["step"] for line in steps] == [1, 2]
    # every completion scored: a call by position, or references not bound to the answer column, would fail them
    assert all(line["rewards/MyRewardModel/missing"] == 0.0 and line["rewards/MyRewardModel/errors"] == 0.0
               for line in steps)


# reference 002 (TRL / Unsloth Python API), only the import changed; QUANTIZE switches the 4-bit model_init_kwargs on
API_SCRIPT = '''
import sys

from datasets import Dataset
from peft import LoraConfig
from transformers import BitsAndBytesConfig

from grpokit import GRPOConfig, GRPOTrainer

MODEL, OUTPUT_DIR, QUANTIZE = sys.argv[1], sys.argv[2], sys.argv[3] == "4bit"


def length_reward(completions, **kwargs):
    return [min(len(c) / 20.0, 1.0) for c in completions]


dataset = Dataset.from_dict({"prompt": ["What is recursion?", "Name a color.", "What is 2 + 2?", "Say hi."]})
init = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")} if QUANTIZE else {}
config = GRPOConfig(
    output_dir=OUTPUT_DIR,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=1,
    max_steps=2,
    logging_steps=1,
    learning_rate=1e-5,
    num_generations=4,
    max_completion_length=8,
    optim="adamw_8bit",
    bf16=False,
    report_to="none",
    model_init_kwargs=init,
)
trainer = GRPOTrainer(
    model=MODEL,
    args=config,
    train_dataset=dataset,
    reward_funcs=[length_reward],
    peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
)
trainer.train()
'''


def _api(tmp_path, model, mode):
    import os
    import subprocess
    import sys

    (tmp_path / "script.py").write_text(API_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "script.py", str(model), "out", mode], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env)


def test_002_the_python_api_prints_logs_and_records_what_ran(tmp_path, tiny_model_dir):
    result = _api(tmp_path, tiny_model_dir, "full")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "step 1/2 |" in result.stdout and "step 2/2 |" in result.stdout  # the CLI's per-step lines
    log_text = (tmp_path / "out" / "training_log.txt").read_text()
    assert "step 1/2 |" in log_text and "step 2/2 |" in log_text
    assert "WARNING: GRPOConfig: optim='adamw_8bit' is ignored" in result.stderr  # said at construction, not INFO
    recorded = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert recorded["dataset"] == "in-memory Dataset: 4 rows, columns prompt"
    assert recorded["use_peft"] is True and recorded["lora_r"] == 4 and recorded["lora_alpha"] == 8
    assert recorded["lora_target_modules"] == ["q_proj", "v_proj"]


def test_002_a_4bit_quantization_config_is_honoured_or_refused_clearly(tmp_path, tiny_model_dir):
    result = _api(tmp_path, tiny_model_dir, "4bit")  # no CUDA GPU here: refused before the model loads
    assert result.returncode != 0
    assert "quantization_config -> load_in_4bit" in result.stdout
    assert "load_in_4bit: " in result.stderr and ("CUDA" in result.stderr or "bitsandbytes" in result.stderr)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # nothing trained in full precision instead
