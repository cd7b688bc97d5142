"""Held-out evaluation: greedy accuracy and the mean of every reward; optionally pass@k and maj@k from samples.

Greedy metrics (`eval/accuracy`, `eval/rewards/NAME/mean`, `eval/completions/*`) come from one
greedy completion per prompt. With `num_samples > 0`, each prompt also gets `num_samples`
sampled completions (the caller's SamplingParams, with a fixed seed, so evaluation draws from its
own per-row generators and never from the training RNG), giving `eval/pass@k`, `eval/maj@k`
(definitions in `eval_stats`), `eval/sampled/rewards/NAME/mean` and `eval/sampled/completions/*`.

Every metric except the counts is the mean over prompts of a per-prompt value (NaN: not applicable,
left out), which `evaluate_per_prompt` also returns so two models can be compared prompt by prompt.
For a sampled reward the per-prompt value is the mean over that prompt's samples.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from grpokit.config.schema import GRPOConfig
from grpokit.data.loading import TokenisedPrompts
from grpokit.errors import ConfigError
from grpokit.evaluation.stats import majority_at_k, normalise_answer, paired_bootstrap_ci, pass_at_k
from grpokit.observe.metrics import nanmean
from grpokit.rewards import RewardBatch, RewardRunner
from grpokit.rewards.builtin import completion_text
from grpokit.rewards.contract import columns_of, decode_completions
from grpokit.rewards.verifiers import completion_answer
from grpokit.rollout.base import Engine, SamplingParams

log = logging.getLogger(__name__)

COUNT_METRICS = ("eval/num_prompts", "eval/num_correct")  # totals, not means over prompts: no per-prompt values


@dataclass(slots=True, kw_only=True)
class EvalResult:
    metrics: dict[str, float]
    per_prompt: dict[str, list[float]]  # metric -> [P] values whose nanmean is the metric


@dataclass(slots=True, kw_only=True)
class Scored:
    """n completions per prompt, prompt-major: row i belongs to prompt i // n."""

    completions: list  # [P*n] texts, or message lists for conversational prompts
    rewards: torch.Tensor  # [P*n, K], NaN where a reward did not apply
    lengths: list[int]  # [P*n] completion tokens
    truncated: list[bool]  # [P*n] finish reason "length"


SPLITS = ("eval", "validation")  # the held-out evaluation's metric prefix and the validation evaluation's


def metric_key(name: str, validation: bool = False) -> str:
    """The metric `metric_for_best_model` names: 'accuracy' -> 'eval/accuracy', or 'validation/accuracy' when the
    run has validation data (`validation`); a name under 'eval/' or 'validation/' says its split itself."""
    if name.startswith(tuple(f"{s}/" for s in SPLITS)):
        return name
    return f"{'validation' if validation else 'eval'}/{name}"


def best_metric_key(cfg: GRPOConfig) -> str | None:
    """The metric this run's best model is chosen on (None: no best model kept)."""
    if not cfg.metric_for_best_model:
        return None
    return metric_key(cfg.metric_for_best_model, validation=cfg.validation_dataset is not None)


def eval_metric_names(cfg: GRPOConfig, reward_names: list[str], split: str = "eval") -> list[str]:
    """The keys an evaluation of this run returns (`evaluate_per_prompt`, the trainer's evaluation), under 'eval/'
    (held-out data) or 'validation/'; a test compares this list with a real evaluation's keys."""
    names = ["accuracy", "num_correct", "num_prompts", "completions/mean_length", "completions/clipped_ratio", "time",
             *(f"rewards/{n}/mean" for n in reward_names)]
    if cfg.eval_num_samples:
        names += [f"{kind}@{k}" for kind in ("pass", "maj") for k in cfg.eval_pass_k]
        names += [*(f"sampled/rewards/{n}/mean" for n in reward_names), "sampled/completions/mean_length",
                  "sampled/completions/clipped_ratio"]
    return [f"{split}/{n}" for n in names]


def unknown_metric(name: str, available: list[str], when: str) -> ConfigError:
    close = difflib.get_close_matches(name, available, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"metric_for_best_model '{name}' is not an eval metric {when}{hint}; the available eval "
                       f"metrics are: {', '.join(sorted(available))} (a bare name means the validation split when "
                       "validation_dataset is set, else eval/)")


def check_best_metric(cfg: GRPOConfig, reward_names: list[str], has_eval_data: bool,
                      has_validation_data: bool = False) -> None:
    """`metric_for_best_model`, before the model loads: data to evaluate on, and a metric this run's evaluation
    returns. Ranking by the held-out split while validation data is there is allowed (the name says so) but said."""
    key = best_metric_key(cfg)
    if key is None:
        return
    split = key.split("/", 1)[0]
    if not (has_validation_data if split == "validation" else has_eval_data):
        setting = "validation_dataset" if split == "validation" else "eval_dataset"
        raise ConfigError(f"metric_for_best_model '{cfg.metric_for_best_model}' needs {setting} to evaluate on: set "
                          f"{setting} (and eval_steps, to evaluate during training), or remove metric_for_best_model")
    expected = eval_metric_names(cfg, reward_names, split)
    if key not in expected:
        raise unknown_metric(cfg.metric_for_best_model, expected, "of this run")
    if split == "eval" and has_validation_data:
        log.warning("metric_for_best_model '%s' ranks by the held-out evaluation although validation_dataset is set: "
                    "the held-out score of best_model/ is then selected on; name 'validation/%s' to rank by the "
                    "validation split", cfg.metric_for_best_model, key.split("/", 1)[1])


def eval_sampling(cfg, max_tokens: int, stop_token_ids: list[int]) -> SamplingParams:
    """The config's rollout sampling settings with seed = cfg.seed: the sampled evaluation's (and `filter`'s) params."""
    return SamplingParams(max_tokens=max_tokens, stop_token_ids=stop_token_ids, seed=cfg.seed, **cfg.sampling())


def sample_and_score(engine: Engine, tokenizer, data: TokenisedPrompts, runner: RewardRunner, n: int,
                     params: SamplingParams, batch_size: int = 64, context: dict | None = None,
                     autocast: Callable[[], AbstractContextManager] = nullcontext) -> Scored:
    """`n` completions per prompt (about `batch_size` completions per engine call), each scored by every reward."""
    conversational = isinstance(data.records[0]["prompt"], list)
    prompts_per_call = max(1, batch_size // n)
    completions, rows, lengths, truncated = [], [], [], []
    for start in range(0, len(data.prompt_ids), prompts_per_call):
        prompt_ids = data.prompt_ids[start:start + prompts_per_call]
        records = data.records[start:start + prompts_per_call]
        with autocast():
            rollout = engine.generate(prompt_ids, n, params)
        texts = decode_completions(tokenizer, rollout.completion_ids, conversational)
        rows.append(runner.score(RewardBatch(prompts=[r["prompt"] for r in records for _ in range(n)],
                                              completions=texts, completion_ids=rollout.completion_ids,
                                              columns=columns_of(records, n),
                                              context=context or {})))
        completions += texts
        lengths += [len(c) for c in rollout.completion_ids]
        truncated += [r == "length" for r in rollout.finish_reasons]
    return Scored(completions=completions, rewards=torch.cat(rows), lengths=lengths, truncated=truncated)


def evaluate_per_prompt(engine: Engine, tokenizer, data: TokenisedPrompts, runner: RewardRunner,
                        accuracy_reward: str, max_tokens: int, stop_token_ids: list[int], batch_size: int = 64,
                        context: dict | None = None, autocast: Callable[[], AbstractContextManager] = nullcontext,
                        stop: list[str] = (), num_samples: int = 0, pass_k: Sequence[int] = (1,),
                        sampling: SamplingParams | None = None) -> EvalResult:
    """eval/* metrics (eval/accuracy = mean of `accuracy_reward` over greedy completions; see the module docstring)
    and the per-prompt values behind them."""
    greedy_params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=stop_token_ids,
                                   stop=list(stop))
    greedy = sample_and_score(engine, tokenizer, data, runner, 1, greedy_params, batch_size, context, autocast)
    per_prompt: dict[str, list[float]] = {}
    metrics: dict[str, float] = {}
    for k, f in enumerate(runner.funcs):
        column = greedy.rewards[:, k]  # [P]
        per_prompt[f"eval/rewards/{f.name}/mean"] = column.tolist()
        metrics[f"eval/rewards/{f.name}/mean"] = nanmean(column)
        if f.name == accuracy_reward:
            per_prompt["eval/accuracy"] = column.tolist()
            metrics["eval/accuracy"] = nanmean(column)
            metrics["eval/num_correct"] = float((column == 1.0).sum())
    metrics["eval/num_prompts"] = float(len(greedy.lengths))
    per_prompt["eval/completions/mean_length"] = [float(x) for x in greedy.lengths]
    per_prompt["eval/completions/clipped_ratio"] = [float(x) for x in greedy.truncated]
    if num_samples:
        if sampling is None:
            raise ValueError("evaluate: num_samples > 0 needs the sampling params (see eval_sampling)")
        sampled = sample_and_score(engine, tokenizer, data, runner, num_samples, sampling, batch_size, context,
                                   autocast)
        per_prompt.update(_sampled_per_prompt(sampled, runner, accuracy_reward, num_samples, pass_k))
    runner.pop_metrics()  # eval failures are logged and counted toward the limit, not mixed into train metrics
    for key, values in per_prompt.items():
        if key not in metrics:
            metrics[key] = nanmean(torch.tensor(values, dtype=torch.float64))
    return EvalResult(metrics=metrics, per_prompt=per_prompt)


def merge_results(parts: list[EvalResult]) -> EvalResult:
    """The evaluation of prompt shards evaluated apart (one per process, in prompt order), as if evaluated
    together: the per-prompt values one after the other, the metrics from them."""
    per_prompt = {key: [v for part in parts for v in part.per_prompt[key]] for key in parts[0].per_prompt}
    metrics = {key: nanmean(torch.tensor(values, dtype=torch.float64)) for key, values in per_prompt.items()}
    metrics["eval/num_prompts"] = float(sum(part.metrics["eval/num_prompts"] for part in parts))
    if "eval/num_correct" in parts[0].metrics:
        metrics["eval/num_correct"] = float(sum(part.metrics["eval/num_correct"] for part in parts))
    return EvalResult(metrics=metrics, per_prompt=per_prompt)


def _sampled_per_prompt(sampled: Scored, runner: RewardRunner, accuracy_reward: str, n: int,
                        pass_k: Sequence[int]) -> dict[str, list[float]]:
    """Per-prompt pass@k, maj@k, sampled reward means, length and truncation from `n` samples per prompt.

    A sample is correct when its accuracy reward is >= 1; a prompt whose accuracy reward applies to
    none of its samples is NaN (left out, like the greedy accuracy); a sample the reward skipped
    (None, or an error the runner logged and counted) counts as not correct.
    """
    names = [f.name for f in runner.funcs]
    if accuracy_reward not in names:
        raise ValueError(f"evaluate: accuracy reward '{accuracy_reward}' is not one of the rewards {names}")
    prompts = len(sampled.lengths) // n
    rewards = sampled.rewards.view(prompts, n, len(names))  # [P, n, K]
    accuracy = rewards[:, :, names.index(accuracy_reward)]  # [P, n]
    applicable = ~accuracy.isnan().all(dim=1)  # [P]
    correct = (accuracy >= 1.0).to(torch.float64)  # [P, n]; NaN compares False
    answers = [normalise_answer(completion_answer(completion_text(c))) for c in sampled.completions]  # [P*n]
    out: dict[str, list[float]] = {}
    for k in pass_k:
        out[f"eval/pass@{k}"] = [pass_at_k(n, int(correct[p].sum()), k) if applicable[p] else math.nan
                                 for p in range(prompts)]
        out[f"eval/maj@{k}"] = [majority_at_k(answers[p * n:(p + 1) * n], correct[p].tolist(), k) if applicable[p]
                                else math.nan for p in range(prompts)]
    for j, name in enumerate(names):
        out[f"eval/sampled/rewards/{name}/mean"] = [nanmean(rewards[p, :, j]) for p in range(prompts)]
    lengths = torch.tensor(sampled.lengths, dtype=torch.float64).view(prompts, n)
    truncated = torch.tensor(sampled.truncated, dtype=torch.float64).view(prompts, n)
    out["eval/sampled/completions/mean_length"] = lengths.mean(dim=1).tolist()
    out["eval/sampled/completions/clipped_ratio"] = truncated.mean(dim=1).tolist()
    return out


BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def compare(a: EvalResult, b: EvalResult) -> dict[str, dict]:
    """Every metric of both results: {metric: {a, b, difference (b - a), ci95}}; ci95 is the 95% paired bootstrap
    interval over prompts (`eval_stats.paired_bootstrap_ci`), None for the counts."""
    if a.metrics.get("eval/num_prompts") != b.metrics.get("eval/num_prompts"):
        raise ValueError("compare: the two evaluations ran on different numbers of prompts")
    rows = {}
    for key in a.metrics.keys() & b.metrics.keys():
        ci = None
        if key in a.per_prompt and key in b.per_prompt:
            ci = list(paired_bootstrap_ci(a.per_prompt[key], b.per_prompt[key], BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED))
        rows[key] = {"a": a.metrics[key], "b": b.metrics[key], "difference": b.metrics[key] - a.metrics[key],
                     "ci95": ci}
    return {key: rows[key] for key in a.metrics if key in rows}  # A's metric order


def jsonable(value):
    """`value` with NaN and infinities as None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
