"""`grpokit export MODEL_DIR [OUTPUT] --merge` through the real CLI: a LoRA run's adapter merged into its base
gives a plain safetensors model whose logits equal the adapter model's (peft over the base) in fp32; adapters
without --merge, non-model directories, an unreachable base and an occupied output are clear errors."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import run_cli, write_jsonl


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    """A 2-step LoRA run on the tiny model, with a learning rate that moves the adapter well away from zero."""
    tmp_path = tmp_path_factory.mktemp("lora-run")
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"What is {a} + {b}?"} for a in range(4) for b in range(4)])
    (tmp_path / "export_rewards.py").write_text(
        "def text_hash_reward(completions, **kwargs):\n"
        "    return [sum(i * ord(ch) for i, ch in enumerate(c, 1)) % 997 / 997 for c in completions]\n")
    config = {"model": str(tiny_model_dir), "dataset": "train.jsonl", "output_dir": "run", "use_peft": True,
              "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "reward_funcs": ["export_rewards.text_hash_reward"],
              "num_generations": 4, "per_device_train_batch_size": 8, "max_completion_length": 6,
              "learning_rate": 5e-2, "beta": 0.0, "max_steps": 2, "save_steps": None, "seed": 1, "device": "cpu"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("train", "cfg.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    adapter = tmp_path / "run" / "final_model"
    lora_b = [t for k, t in load_file(adapter / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and all(t.abs().max() > 1e-3 for t in lora_b), \
        "the adapter did not move: the test would prove nothing"
    return tmp_path


def _logits(model, input_ids):
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits


def test_merged_model_equals_the_adapter_model(lora_run, tiny_model_dir, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_cli("export", "run/final_model", "--merge", cwd=lora_run)
    assert result.returncode == 0, result.stderr
    merged_dir = lora_run / "run" / "final_model-merged"  # the default OUTPUT
    assert "merged the LoRA adapter into its base model" in result.stdout and str(merged_dir) in result.stdout
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "config.json").is_file()
    assert (merged_dir / "tokenizer.json").is_file() and (merged_dir / "tokenizer_config.json").is_file()
    assert not (merged_dir / "adapter_config.json").exists() and not list(merged_dir.glob("adapter_model*"))
    assert not list(merged_dir.parent.glob(".*.tmp"))

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    texts = ("What is 1 + 2?", "Hello, world!!", "0123456789xyz")
    input_ids = torch.tensor([tokenizer.encode(t)[:12] for t in texts])  # [3, 12], one character per token
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                        lora_run / "run" / "final_model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected = _logits(adapter, input_ids)  # [3, 12, V]
    assert (expected - _logits(base, input_ids)).abs().max() > 1e-3  # the adapter changes the outputs
    torch.testing.assert_close(_logits(merged, input_ids), expected, rtol=0, atol=1e-5)


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_adapter_errors(lora_run):
    no_merge = run_cli("export", "run/final_model", "out", cwd=lora_run)
    assert no_merge.returncode == 2 and "is a LoRA adapter: pass --merge" in no_merge.stderr

    moved = lora_run / "moved_adapter"
    shutil.copytree(lora_run / "run" / "final_model", moved, dirs_exist_ok=True)
    config = json.loads((moved / "adapter_config.json").read_text())
    base = config["base_model_name_or_path"]
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/nowhere/base"}))
    missing = run_cli("export", "moved_adapter", "out", "--merge", cwd=lora_run)
    assert missing.returncode == 2, missing.stderr
    assert "cannot load the adapter's base model '/nowhere/base' (base_model_name_or_path in" in missing.stderr
    assert "--base-model" in missing.stderr and "Traceback" not in missing.stderr
    fixed = run_cli("export", "moved_adapter", "out", "--merge", "--base-model", base, cwd=lora_run)
    assert fixed.returncode == 0, fixed.stderr
    assert (lora_run / "out" / "model.safetensors").is_file()

    occupied = run_cli("export", "moved_adapter", "out", "--merge", "--base-model", base, cwd=lora_run)
    assert occupied.returncode == 2 and "exists and is not empty" in occupied.stderr


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_non_model_directories_are_clear_errors(tmp_path, tiny_model_dir):
    (tmp_path / "run" / "final_model").mkdir(parents=True)
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    result = run_cli("export", "run", "out", "--merge", cwd=tmp_path)
    assert result.returncode == 2
    assert "'run' holds neither a LoRA adapter (adapter_config.json) nor a model (config.json)" in result.stderr
    assert "did you mean run/final_model?" in result.stderr and not (tmp_path / "out").exists()

    full = run_cli("export", str(tiny_model_dir), "full", cwd=tmp_path)  # a full model is copied, --merge or not
    assert full.returncode == 0, full.stderr
    assert "a full model, nothing to merge" in full.stdout and (tmp_path / "full" / "model.safetensors").is_file()


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_eval_takes_a_lora_output_directly_and_scores_it_as_its_merged_model(lora_run):
    """Reference 004's pipeline ends with `grpokit eval` on the GRPO run's final_model: with LoRA that is an adapter
    directory, evaluated (alone or in --compare) merged into its base, exactly as the exported merged model is."""
    write_jsonl(lora_run / "qa.jsonl", [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)}
                                        for a in range(3) for b in range(3)])
    exported = run_cli("export", "run/final_model", "merged-for-eval", "--merge", cwd=lora_run)
    assert exported.returncode == 0, exported.stderr
    common = ["--data", "qa.jsonl", "--rewards", "export_rewards.text_hash_reward", "--set", "max_completion_length=6",
              "--set", "device=cpu", "--set", "bf16=false"]
    alone = run_cli("eval", "--model", "run/final_model", *common, "--output", "adapter.json", cwd=lora_run)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    assert "run/final_model is a LoRA adapter: evaluated merged into its base model" in alone.stdout
    compared = run_cli("eval", "--model", "merged-for-eval", "--compare", "run/final_model", *common,
                       "--output", "cmp.json", cwd=lora_run)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    metrics = json.loads((lora_run / "adapter.json").read_text())
    both = json.loads((lora_run / "cmp.json").read_text())
    assert metrics["eval/num_prompts"] == 9
    assert both["model_a"]["metrics"] == both["model_b"]["metrics"] == metrics
