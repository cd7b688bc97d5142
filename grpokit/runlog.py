"""What a run tells its user besides the per-step metrics: the start-of-run summary and sampled completions."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from grpokit.trainer import Generation, Trainer


def summary(trainer: Trainer) -> None:
    cfg = trainer.cfg
    params = list(trainer.policy.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    trainer._say(f"model {cfg.model}: {trainable / 1e6:.1f}M trainable of {total / 1e6:.1f}M parameters on "
                 f"{trainer.device}{' (bf16 autocast)' if cfg.bf16 else ''}")
    trainer._say(f"data: {len(trainer.train_data.prompt_ids)} train prompts"
                 + (f", {len(trainer.eval_data.prompt_ids)} held-out" if trainer.eval_data else "")
                 + f"; per generation: {cfg.prompts_per_generation} prompts x {cfg.num_generations} completions in "
                 f"{cfg.micro_batches_per_generation} micro-batch(es) of {cfg.per_device_train_batch_size}, "
                 f"{cfg.optimizer_steps_per_generation} optimizer step(s) of {cfg.gradient_accumulation_steps} "
                 f"micro-batch(es) each; loss_type {cfg.loss_type}, importance sampling per "
                 f"{cfg.importance_sampling_level}")
    if cfg.save_steps and cfg.save_steps <= cfg.max_steps:
        kept = f", the newest {cfg.save_total_limit} kept" if cfg.save_total_limit else ""
        trainer._say(f"checkpoints every {cfg.save_steps} steps to {cfg.output_dir}/checkpoint-N{kept}")


def show_sample(trainer: Trainer, batch: Generation) -> None:
    """One completion of this generation with its rewards, every `log_completions_steps` (training-wizard's sample_rate)."""
    names = [f.name for f in trainer.reward_funcs]
    rewards = ", ".join(f"{n}={v:.3g}" for n, v in zip(names, batch.rewards[0].tolist(), strict=True))
    prompt = trainer.tokenizer.decode(batch.prompt_ids[0], skip_special_tokens=True)
    completion = trainer.tokenizer.decode(batch.completion_ids[0], skip_special_tokens=True)
    trainer._say(f"sample before step {trainer.global_step + 1}:\n  prompt: {prompt!r}\n  completion: {completion!r}\n"
                 f"  rewards: {rewards}")
