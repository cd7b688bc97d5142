"""Reference workflow: TRL's GRPOTrainer Python API, run by grpokit.

The code TRL users write (a `datasets.Dataset` of chat-templated prompts, plain reward functions,
`GRPOConfig` + `GRPOTrainer` with a LoRA config, `trainer.train()`, `trainer.save_model()`), with
only the import changed from `trl` to `grpokit`. Default model: the embedded SmolLM2-135M-Instruct
(no download); `--model` takes a hub id or a local model directory.

    python examples/trl_python_api.py --max-steps 2
"""

import argparse

from datasets import Dataset
from peft import LoraConfig
from transformers import AutoTokenizer

from grpokit import GRPOConfig, GRPOTrainer  # was: from trl import GRPOConfig, GRPOTrainer
from grpokit.models.loading import resolve_model_path


def length_reward(completions, prompts=None):
    """Reward based on response length."""
    rewards = []
    for completion in completions:
        length = len(completion.split())
        if length < 5:
            rewards.append(-1.0)
        elif length < 50:
            rewards.append(1.0)
        else:
            rewards.append(0.5)
    return rewards


def format_reward(completions, prompts=None):
    """Reward proper formatting."""
    rewards = []
    for completion in completions:
        score = 0.0
        if completion.endswith("."):
            score += 0.5
        if not completion.startswith(" "):
            score += 0.5
        rewards.append(score)
    return rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--output-dir", default="grpo_output")
    cli = parser.parse_args()

    model_path = resolve_model_path(cli.model)  # the embedded default becomes a local directory
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    questions = ["What is recursion?", "Why is the sky blue?", "What does a compiler do?", "Name three prime numbers."]
    dataset = Dataset.from_dict({"prompt": [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions]})

    grpo_config = GRPOConfig(
        output_dir=cli.output_dir,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=cli.max_steps,
        learning_rate=1e-5,
        bf16=False,
        optim="adamw_8bit",  # accepted and noted: grpokit uses torch AdamW
        max_completion_length=32,
        num_generations=4,
        beta=0.1,
        report_to="none",
    )
    trainer = GRPOTrainer(
        model=model_path,
        args=grpo_config,
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_funcs=[length_reward, format_reward],
        reward_weights=[0.5, 0.5],
        peft_config=LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                               "gate_proj", "up_proj", "down_proj"]),
    )
    output = trainer.train()
    trainer.save_model()
    print(f"global_step={output.global_step} training_loss={output.training_loss:.4f} "
          f"saved to {grpo_config.output_dir}")


if __name__ == "__main__":
    main()
