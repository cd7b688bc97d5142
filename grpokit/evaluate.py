"""Greedy evaluation on held-out prompts: accuracy and the mean of every reward."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from grpokit.data import TokenisedPrompts
from grpokit.metrics import nanmean
from grpokit.rewards import RewardBatch, RewardRunner
from grpokit.rollout.base import Engine, SamplingParams


def decode_completions(tokenizer, completion_ids: list[list[int]], conversational: bool) -> list:
    """Completion texts, or TRL's message-list form for conversational prompts."""
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts


def columns_of(records: list[dict], repeat: int) -> dict[str, list]:
    """Dataset columns, each value repeated for the `repeat` completions of its prompt."""
    return {key: [r[key] for r in records for _ in range(repeat)] for key in records[0]}


def evaluate(engine: Engine, tokenizer, data: TokenisedPrompts, runner: RewardRunner,
             accuracy_reward: str, max_tokens: int, stop_token_ids: list[int], batch_size: int = 64,
             context: dict | None = None, autocast: Callable[[], AbstractContextManager] = nullcontext,
             stop: list[str] = ()) -> dict[str, float]:
    """Greedy completions for every prompt; returns eval/* metrics (eval/accuracy = mean of `accuracy_reward`)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=stop_token_ids, stop=list(stop))
    conversational = isinstance(data.records[0]["prompt"], list)
    rows, lengths, truncated = [], [], 0
    for start in range(0, len(data.prompt_ids), batch_size):
        prompt_ids = data.prompt_ids[start:start + batch_size]
        records = data.records[start:start + batch_size]
        with autocast():
            rollout = engine.generate(prompt_ids, 1, params)
        completions = decode_completions(tokenizer, rollout.completion_ids, conversational)
        rows.append(runner.score(RewardBatch(prompts=[r["prompt"] for r in records], completions=completions,
                                              completion_ids=rollout.completion_ids, columns=columns_of(records, 1),
                                              context=context or {})))
        lengths += [len(c) for c in rollout.completion_ids]
        truncated += sum(r == "length" for r in rollout.finish_reasons)
    rewards = torch.cat(rows)  # [N, K]
    metrics: dict[str, float] = {}
    runner.pop_metrics()  # eval failures are logged and counted toward the limit, not mixed into train metrics
    for k, f in enumerate(runner.funcs):
        column = rewards[:, k]
        metrics[f"eval/rewards/{f.name}/mean"] = nanmean(column)
        if f.name == accuracy_reward:
            metrics["eval/accuracy"] = nanmean(column)
            metrics["eval/num_correct"] = float((column == 1.0).sum())
    metrics["eval/num_prompts"] = float(len(lengths))
    metrics["eval/completions/mean_length"] = sum(lengths) / len(lengths)
    metrics["eval/completions/clipped_ratio"] = truncated / len(lengths)
    return metrics

