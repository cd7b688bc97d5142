"""What a run tells its user besides the per-step metrics: the start-of-run summary (model, data, and how
prompts become completions, micro-batches and optimizer steps) and the sampled completions with their
rewards (OUTPUT_DIR/completions/step_N.jsonl, one line per completion, plus a short sample on the console)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grpokit.algo import loss
from grpokit.runtime import allocator
from grpokit.runtime.distributed import world_size

if TYPE_CHECKING:
    from grpokit.config.schema import GRPOConfig

SAMPLE_CHARS = 300  # a console sample shows at most this many characters of the prompt and of the completion


def precision(cfg: GRPOConfig) -> str | None:
    """The run's precision as its summary says it: "bf16 autocast", or with `bf16: auto` its note either way (the
    CPU or GPU has native bf16, or why not); None for a float32 run that asked for it."""
    return cfg.settled_from_auto.get("bf16") or ("bf16 autocast" if cfg.bf16 is True else None)


def summary_lines(cfg: GRPOConfig, policy, *, device, train_prompts: int, eval_prompts: int | None,
                  onednn_linear: bool = False, validation_prompts: int | None = None) -> list[str]:
    """The start-of-run summary: the model and its trainable share, the data, the batch accounting, checkpoints.
    `policy`: the model (its parameters are counted); `eval_prompts` / `validation_prompts`: None without
    held-out / validation data."""
    params = list(policy.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    share = 100 * trainable / max(total, 1)
    lines = [f"model {cfg.model}: {trainable:,} trainable of {total:,} parameters ({share:.1f}%) on {device}"
             f"{f' ({precision(cfg)})' if precision(cfg) else ''}"
             f"{' (float32 linear layers on oneDNN)' if onednn_linear else ''}"]
    if str(device).startswith("cpu"):  # where freed tensor memory is the C allocator's to keep or reuse
        lines.append(allocator.describe())
    generations = math.ceil(cfg.max_steps / cfg.optimizer_steps_per_generation)
    lines.append(f"data: {train_prompts} train prompts" + (f", {eval_prompts} held-out" if eval_prompts else "")
                 + (f", {validation_prompts} validation" if validation_prompts else "")
                 + f"; {cfg.max_steps} optimizer steps = {generations} generation(s) of {cfg.prompts_per_generation} "
                 f"prompts = {generations * cfg.prompts_per_generation / max(train_prompts, 1):.2f} epoch(s)")
    lines.extend(batch_lines(cfg))
    if cfg.save_steps and cfg.save_steps <= cfg.max_steps:
        kept = f", the newest {cfg.save_total_limit} kept" if cfg.save_total_limit else ""
        lines.append(f"checkpoints every {cfg.save_steps} steps to {cfg.output_dir}/checkpoint-N{kept}")
    return lines


def batch_lines(cfg: GRPOConfig) -> list[str]:
    """The batch accounting: prompts and completions per generation, micro-batches, optimizer steps, how far
    off-policy the updates get, the loss normaliser and the most tokens a generation can hold."""
    g, per_micro, accum = cfg.num_generations, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    steps, processes = cfg.optimizer_steps_per_generation, world_size()
    seqs_per_step = per_micro * accum * processes
    each = f" in each of {processes} processes" if processes > 1 else ""
    lines = [f"per generation: {cfg.prompts_per_generation} prompts x {g} completions = {cfg.generation_batch_size} "
             f"completions in {cfg.micro_batches_per_generation} micro-batch(es) of {per_micro}{each}; "
             f"per optimizer step: {accum} micro-batch(es){each} = {seqs_per_step} completions "
             f"({seqs_per_step / g:g} prompts); {steps} optimizer step(s) per generation "
             f"(num_iterations {cfg.num_iterations} x {cfg.micro_batches_per_generation // accum} step(s) per pass)"]
    if steps == 1:
        lines.append("on-policy: each generation is used for 1 optimizer step, by the policy that sampled it")
    else:
        lines.append(f"off-policy: each generation is used for {steps} optimizer steps; the last uses a policy "
                     f"{steps - 1} update(s) old (importance ratios clipped to [1 - {cfg.epsilon:g}, "
                     f"1 + {cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon:g}], "
                     f"per {cfg.importance_sampling_level})")
    normaliser = loss.describe(cfg.loss_type, step_sequences=seqs_per_step, process_sequences=per_micro * accum,
                               max_completion_length=cfg.max_completion_length)
    lines.append(f"loss_type {cfg.loss_type}: loss = {normaliser}")
    if cfg.max_prompt_length is None:
        lines.append(f"tokens: prompts unbounded (max_prompt_length none) + at most {cfg.max_completion_length} "
                     f"per completion")
    else:
        per_seq = cfg.max_prompt_length + cfg.max_completion_length
        lines.append(f"tokens: at most {cfg.generation_batch_size * per_seq:,} per generation "
                     f"({cfg.prompts_per_generation} prompts x {g} x ({cfg.max_prompt_length} + "
                     f"{cfg.max_completion_length})), {seqs_per_step * per_seq:,} per optimizer step, "
                     f"{per_micro * per_seq:,} per micro-batch")
    return lines


EVALUATIONS_FILE = "evaluations.jsonl"


def write_evaluation(output_dir: Path, step: int, label: str, accuracy: Sequence[float] | None,
                     split: str = "eval") -> None:
    """One line of OUTPUT_DIR/evaluations.jsonl: an evaluation's greedy accuracy per prompt, in the data's order
    (1 right, 0 wrong, null: the accuracy reward did not apply), so that two evaluations of a run compare prompt by
    prompt (which prompts training fixed, which it broke). `split`: 'eval' (the held-out data) or 'validation'."""
    record = {"step": step, "label": label, "split": split,
              "accuracy": None if accuracy is None else [_number(v) for v in accuracy]}
    with open(output_dir / EVALUATIONS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def log_completions(output_dir: str | Path, step: int, prompts: Sequence, completions: Sequence,
                    reward_names: Sequence[str], rewards, advantages, finish_reasons: Sequence[str],
                    echo: Callable[[str], Any] | None = print, total_rewards=None) -> Path:
    """Write OUTPUT_DIR/completions/step_{step}.jsonl, one line per completion: step, prompt (text or chat
    messages), completion, each reward by name (null: not applicable), total_reward (when given), advantage,
    finish_reason. `rewards` [N, K] and `advantages`, `total_rewards` [N]: tensors or lists. Echoes the first
    completion, shortened, through `echo` (None: no echo). Returns the file's path."""
    rows = _rows(rewards)
    advantages = _floats(advantages)
    totals = _floats(total_rewards) if total_rewards is not None else [None] * len(rows)
    path = Path(output_dir) / "completions" / f"step_{step}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for prompt, completion, row, advantage, total, finish in zip(prompts, completions, rows, advantages, totals,
                                                                      finish_reasons, strict=True):
            record = {"step": step, "prompt": prompt, "completion": completion,
                      "rewards": {name: _number(v) for name, v in zip(reward_names, row, strict=True)}}
            if total_rewards is not None:
                record["total_reward"] = _number(total)
            record.update(advantage=_number(advantage), finish_reason=finish)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    if echo is not None and rows:
        echo(sample_text(f"sample at step {step}", prompts[0], completions[0], reward_names, rows[0],
                         advantages[0], finish_reasons[0]))
    return path


def sample_text(title: str, prompt, completion, reward_names: Sequence[str], rewards: Sequence[float],
                advantage: float | None, finish_reason: str | None) -> str:
    shown = ", ".join(f"{n}={_fmt(v)}" for n, v in zip(reward_names, rewards, strict=True))
    extra = "" if advantage is None else f"; advantage {advantage:+.3g}"
    extra += "" if finish_reason is None else f"; finished by {finish_reason}"
    return (f"{title}:\n  prompt: {_clip(_text(prompt))!r}\n  completion: {_clip(_text(completion))!r}\n"
            f"  rewards: {shown}{extra}")


def _text(value) -> str:
    """A prompt or completion as text: chat messages show as 'role: content' lines."""
    if isinstance(value, str):
        return value
    return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in value)


def _clip(text: str, limit: int = SAMPLE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


def _fmt(value) -> str:
    return "n/a" if _number(value) is None else f"{value:.3g}"


def _number(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _floats(values) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _rows(rewards) -> list[list]:
    return [list(r) for r in _floats(rewards)]
