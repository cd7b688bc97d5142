"""The TRL-compatible Python API: reference 002's GRPOTrainer code with only the import changed."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from grpokit import GRPOConfig, GRPOTrainer
from grpokit.errors import ConfigError, DataError, GrpokitError
from grpokit.runtime import bf16_unsupported
from tests.conftest import build_tiny_model

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trl_python_api.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("trl_python_api", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the reward functions exactly as reference 002 writes them, from the shipped example
_example = _load_example()
length_reward, format_reward = _example.length_reward, _example.format_reward


def text_hash_reward(completions, **kwargs):
    """Differs between almost any two completions, so every group has a spread and gradients flow."""
    return [sum(i * ord(ch) for i, ch in enumerate(c, 1)) % 997 / 997 for c in completions]


QUESTIONS = ["What is recursion?", "Name a color.", "What is 2 + 2?", "Say hi."]


def _config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "grpo_output"), per_device_train_batch_size=4,
                    gradient_accumulation_steps=1, max_steps=2, learning_rate=1e-2, fp16=False, bf16=False,
                    optim="adamw_8bit", max_completion_length=8, num_generations=4, beta=0.1, seed=0,
                    report_to="none", save_steps=1000, device="cpu")
    return GRPOConfig(**{**settings, **overrides})


def _reference_002_run(tmp_path, reward_funcs, reward_weights):
    """Reference 002's dataset, config and GRPOTrainer call, with a LoRA config and a tiny model."""
    from datasets import Dataset
    from peft import LoraConfig

    model, tokenizer = build_tiny_model()
    dataset = Dataset.from_dict({"prompt": [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS]})
    grpo_config = _config(tmp_path)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = GRPOTrainer(
        model=model,
        args=grpo_config,
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_funcs=reward_funcs,
        reward_weights=reward_weights,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora_before and all("lora_" in n for n in lora_before)
    output = trainer.train()
    assert output.global_step == 2 and output.training_loss == output.training_loss  # not NaN
    base_after = trainer.model.get_base_model().state_dict()
    for name, value in base_before.items():
        key = name.replace("q_proj.weight", "q_proj.base_layer.weight").replace("v_proj.weight",
                                                                                "v_proj.base_layer.weight")
        assert torch.equal(value, base_after[key]), f"base weight {name} changed"
    return trainer, lora_before


def test_reference_002_snippet_runs_and_saves_adapters(tmp_path):
    trainer, _ = _reference_002_run(tmp_path, [length_reward, format_reward], [0.5, 0.5])
    saved = tmp_path / "saved"
    trainer.save_model(str(saved))
    assert (saved / "adapter_config.json").is_file() and (saved / "adapter_model.safetensors").is_file()
    assert (saved / "tokenizer_config.json").is_file() and (saved / "tokenizer.json").is_file()
    assert not (saved / "model.safetensors").exists()

    run = Path(trainer.args.output_dir)
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["reward_funcs"] == ["trl_python_api.length_reward", "trl_python_api.format_reward"]
    assert recorded["reward_weights"] == [0.5, 0.5] and recorded["max_steps"] == 2
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "rewards/length_reward/mean" in metrics[-1] and "rewards/format_reward/mean" in metrics[-1]


def test_reference_002_trains_every_lora_parameter(tmp_path):
    # 002's rewards give a random character-level model no spread (every completion is < 5 words);
    # a third reward that differs between completions makes the advantages, and so the update, non-zero
    trainer, lora_before = _reference_002_run(tmp_path, [length_reward, format_reward, text_hash_reward],
                                              [0.5, 0.5, 1.0])
    after = dict(trainer.model.named_parameters())
    unchanged = [n for n, p in lora_before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, f"LoRA parameters not updated: {unchanged}"


def test_a_peft_model_trains_its_own_adapters_and_saves_them_loadable(tmp_path, tiny_model_dir):
    """Reference 002 with Unsloth's `FastLanguageModel.get_peft_model` (here peft's `get_peft_model`): the model
    passed already has LoRA adapters. They train as they are (not wrapped again, not re-initialised), and the saved
    adapter loads onto the base model with the trained values."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():  # an adapter already trained (by SFT, say): lora_B away from peft's zero start
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.25)
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    trainer = GRPOTrainer(model=model, reward_funcs=text_hash_reward, args=_config(tmp_path, learning_rate=1e-3),
                          train_dataset=[{"prompt": q} for q in QUESTIONS])
    assert trainer.model is model and sorted(n for n, p in model.named_parameters() if p.requires_grad) == names
    assert all((p - 0.25).abs().max() == 0 for n, p in model.named_parameters() if "lora_B" in n)
    trainer.train()
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    assert all(0 < (p - 0.25).abs().max() < 0.1 for p in trained.values()), "adapters kept and trained from 0.25"
    assert yaml.safe_load((Path(trainer.args.output_dir) / "config.yaml").read_text())["lora_r"] == 4
    for saved in (Path(trainer.args.output_dir) / "final_model", tmp_path / "saved"):
        if saved.name == "saved":
            trainer.save_model(str(saved))
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), saved)
        got = {n: p for n, p in loaded.named_parameters() if "lora_B" in n}
        assert sorted(got) == sorted(trained)
        assert all(torch.equal(got[n], trained[n]) for n in trained), saved


def test_a_peft_model_with_a_peft_config_or_frozen_adapters_is_refused(tmp_path, tiny_model_dir):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora)
    with pytest.raises(ConfigError, match="already has LoRA adapters .*merge_and_unload"):
        GRPOTrainer(model=model, reward_funcs=text_hash_reward, args=_config(tmp_path), peft_config=lora,
                    train_dataset=[{"prompt": q} for q in QUESTIONS])
    model.save_pretrained(tmp_path / "adapter")
    frozen = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    with pytest.raises(ConfigError, match="no trainable parameters .* is_trainable=True"):
        GRPOTrainer(model=frozen, reward_funcs=text_hash_reward, args=_config(tmp_path),
                    train_dataset=[{"prompt": q} for q in QUESTIONS])


def test_list_of_dicts_model_by_path_and_epochs(tmp_path, tiny_model_dir):
    rows = [{"prompt": q, "answer": "x"} for q in QUESTIONS]
    args = _config(tmp_path, max_steps=-1, num_train_epochs=1, beta=0.0, reward_weights=[1.0, 2.0])
    assert args.max_steps == -1 and args.learning_rate == 1e-2 and args.report_to == "none"
    trainer = GRPOTrainer(str(tiny_model_dir), reward_funcs=[text_hash_reward, "answer_format"], args=args,
                          train_dataset=rows)
    # 4 prompts x 1 epoch at 1 prompt (4 completions / 4 per group) per generation, 1 step each
    assert trainer.config.max_steps == 4
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    output = trainer.train()
    assert output.global_step == 4
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(before[n], p.detach())]
    assert not unchanged
    trainer.save_model()
    assert (Path(args.output_dir) / "model.safetensors").is_file()
    assert (Path(args.output_dir) / "tokenizer_config.json").is_file()


def test_model_object_loads_its_tokenizer_from_name_or_path(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = GRPOTrainer(model, reward_funcs=text_hash_reward, args=_config(tmp_path, max_steps=1),
                          train_dataset=[{"prompt": q} for q in QUESTIONS])
    assert trainer.processing_class.eos_token == "<|im_end|>"
    assert trainer.train().global_step == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"learnig_rate": 1e-5}, "did you mean 'learning_rate'"),
    ({"num_generations": 1}, "num_generations"),
    ({"num_generations": 3, "per_device_train_batch_size": 4}, "not divisible by num_generations"),
    ({"push_to_hub": True}, "push_to_hub is not supported"),
    ({"reward_funcs": ["length"]}, "GRPOTrainer(reward_funcs=...)"),
    ({"loss_type": "ppo"}, "loss_type"),
])
def test_bad_config_arguments(kwargs, message):
    with pytest.raises(ConfigError) as err:
        GRPOConfig(**kwargs)
    assert message in str(err.value)


def test_harmless_trl_arguments_are_noted(caplog):
    with caplog.at_level("INFO", logger="grpokit"):
        args = GRPOConfig(logging_dir="logs", save_steps=10, remove_unused_columns=False, fp16=True, max_steps=3)
    assert args.max_steps == 3 and args.save_steps == 10
    assert "logging_dir='logs' is ignored" in caplog.text and "fp16=True" in caplog.text


def test_trl_defaults_and_translations():
    args = GRPOConfig(max_steps=3)
    run = args.run_config
    native = bf16_unsupported(None) is None
    assert (run.lr_scheduler_type, run.logging_steps, run.output_dir) == ("linear", 10, "trainer_output")
    # bf16 unset: auto, settled at once on this machine, so args.bf16 reads a bool as TRL's does
    assert args.bf16 is native and run.bf16 is native and set(run.settled_from_auto) == {"bf16"}
    assert GRPOConfig(max_steps=3, fp16=True).run_config.bf16 is False
    assert GRPOConfig(max_steps=3, bf16=None).bf16 is native  # recent TRL's "not set"
    assert GRPOConfig(max_steps=3, bf16=True).run_config.settled_from_auto == {}
    # the run's own config gets auto back: it settles it itself, and a resumed run takes its checkpoint's value
    assert args.resolved(4, [{"func": "length"}], None, "m").bf16 == "auto"
    assert GRPOConfig(max_steps=3, bf16=False).resolved(4, [{"func": "length"}], None, "m").bf16 is False
    assert GRPOConfig(max_steps=3, lr_scheduler_type="constant", logging_steps=1).run_config.logging_steps == 1
    assert GRPOConfig(max_steps=3, save_strategy="no").run_config.save_steps is None
    assert GRPOConfig(max_steps=3, save_steps=7, save_total_limit=1).run_config.save_total_limit == 1
    assert GRPOConfig(max_steps=3, log_completions=True, logging_steps=5).run_config.log_completions_steps == 5
    vllm = GRPOConfig(max_steps=3, vllm_server_host="10.0.0.2", vllm_server_port=8123).run_config
    assert (vllm.vllm_host, vllm.vllm_port) == ("10.0.0.2", 8123)


def test_train_resumes_from_a_checkpoint_like_trl(tmp_path, tiny_model_dir):
    def run(**train_kwargs):
        trainer = GRPOTrainer(str(tiny_model_dir), reward_funcs=text_hash_reward,
                              args=_config(tmp_path, max_steps=3, save_steps=1, lr_scheduler_type="linear"),
                              train_dataset=[{"prompt": q} for q in QUESTIONS])
        output = trainer.train(**train_kwargs)
        return output, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    straight, weights = run()
    out = Path(straight.output_dir)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    resumed, resumed_weights = run(resume_from_checkpoint=str(out / "checkpoint-1"))
    assert resumed.global_step == 3
    assert all(torch.equal(weights[n], resumed_weights[n]) for n in weights)
    _, latest_weights = run(resume_from_checkpoint=True)  # the newest: checkpoint-2
    assert all(torch.equal(weights[n], latest_weights[n]) for n in weights)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"callbacks": [object()]}, GrpokitError, "callbacks is not supported"),
    ({"optimizers": (object(), None)}, GrpokitError, "optimizers is not supported"),
    ({"reward_weights": [1.0, 2.0]}, ConfigError, "reward_weights has 2 values but there are 1"),
    ({"train_dataset": []}, DataError, "train_dataset is empty"),
    ({"train_dataset": [{"question_text": "hi"}]}, DataError, "no prompt column"),
    ({"reward_funcs": "lenght"}, Exception, "did you mean 'length'"),
    ({"reward_funcs": 3}, ConfigError, "reward_funcs[0] is a int"),
])
def test_bad_trainer_arguments(tmp_path, tiny_model_dir, kwargs, error, message):
    arguments = {"model": str(tiny_model_dir), "reward_funcs": text_hash_reward, "args": _config(tmp_path),
                 "train_dataset": [{"prompt": q} for q in QUESTIONS], **kwargs}
    with pytest.raises(error) as err:
        GRPOTrainer(**arguments)
    assert message in str(err.value)


def test_reward_weights_in_both_places_must_agree(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="differ between GRPOConfig"):
        GRPOTrainer(str(tiny_model_dir), reward_funcs=[length_reward, format_reward],
                    args=_config(tmp_path, reward_weights=[1.0, 1.0]), train_dataset=[{"prompt": "hi"}],
                    reward_weights=[0.5, 0.5])


def test_example_script_runs_with_the_tiny_model(tmp_path, tiny_model_dir):
    result = subprocess.run([sys.executable, str(EXAMPLE), "--model", str(tiny_model_dir), "--max-steps", "1",
                             "--output-dir", str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr + result.stdout
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert "global_step=1" in result.stdout


def test_train_into_a_run_directory_needs_overwrite_output_dir(tmp_path, tiny_model_dir):
    rows = [{"prompt": q} for q in QUESTIONS]

    def run(**overrides):
        trainer = GRPOTrainer(str(tiny_model_dir), reward_funcs=text_hash_reward, train_dataset=rows,
                              args=_config(tmp_path, max_steps=1, **overrides))
        return trainer.train()

    run()
    out = tmp_path / "grpo_output"
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ConfigError, match="holds a run .*overwrite"):
        run()
    assert sorted(p.name for p in out.iterdir()) == before
    run(overwrite_output_dir=True)  # TRL's argument: the old run moves aside whole
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("grpo_output.old-")]
    assert len(moved) == 1 and sorted(p.name for p in moved[0].iterdir()) == before
