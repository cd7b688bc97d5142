"""Model use outside training: held-out evaluation (`grpokit eval`, also of two models side by side),
sampling completions (`grpokit generate`), keeping the training prompts a model sometimes but not
always solves (`grpokit filter`) and merging a LoRA run into a full model (`grpokit export`).

They reuse the trainer's pieces: the config's data and rewards, the model loaders, the in-process
sampler and `evaluate.evaluate_per_prompt`, so a number printed here equals the trainer's eval/* metric.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from grpokit.config import GRPOConfig
from grpokit.data import loading as data_mod
from grpokit.errors import ConfigError
from grpokit.evaluation.evaluate import (
    EvalResult,
    eval_sampling,
    evaluate_per_prompt,
    sample_and_score,
)
from grpokit.models import cpu_linear
from grpokit.models.loading import load_policy, load_tokenizer, resolve_model_path, stop_token_ids, transform_tokenizer
from grpokit.rewards import RewardRunner, resolve_rewards
from grpokit.rewards.contract import decode_completions
from grpokit.rollout.torch_engine import TorchEngine
from grpokit.runtime import run_device

log = logging.getLogger(__name__)


def _load(cfg: GRPOConfig):
    """The model `cfg.model` names, ready to generate: a model directory or hub id, or a LoRA adapter directory (a
    run's final_model, best_model or checkpoint-N with LoRA), merged into its base model."""
    device = torch.device(run_device(cfg.device))
    adapter = Path(cfg.model).expanduser()
    if (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").is_file():
        model, base = _merged(adapter, None, command="eval")
        model = model.to(getattr(torch, cfg.torch_dtype))
        tokenizer = load_tokenizer(str(adapter) if any(adapter.glob("tokenizer*")) else resolve_model_path(base))
        log.info("%s is a LoRA adapter: evaluated merged into its base model %s", cfg.model, base)
    else:
        path = resolve_model_path(cfg.model)
        tokenizer = load_tokenizer(path)
        model = load_policy(path, getattr(torch, cfg.torch_dtype))
    model = model.to(device).eval()
    cpu_linear.apply(model, cfg.cpu_linear, device)
    engine = TorchEngine(model, tokenizer.pad_token_id, tokenizer=tokenizer, cpu_linear=cfg.cpu_linear)
    return model, tokenizer, engine, stop_token_ids(tokenizer, model)


def _autocast(cfg: GRPOConfig, model: torch.nn.Module):
    """What the trainer generates under: bf16 autocast when `bf16` is set or settles on (so eval here equals its
    eval/*)."""
    device_type = next(model.parameters()).device.type
    enabled = cfg.settle_auto().bf16
    return lambda: torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled)


def _runner(cfg: GRPOConfig, funcs, records: list[dict], log_name: str) -> RewardRunner:
    for f in funcs:
        f.check_columns(records[0].keys())
    return RewardRunner(funcs, timeout=cfg.reward_timeout, error_rate_limit=cfg.reward_error_rate_limit,
                        error_log=Path(cfg.output_dir) / log_name)


def evaluate_model(cfg: GRPOConfig) -> dict[str, float]:
    """eval/* metrics of `cfg.model` on `cfg.eval_dataset` (at most eval_limit prompts; see `evaluate_models`)."""
    return evaluate_models(cfg, [cfg.model])[0].metrics


def evaluate_models(cfg: GRPOConfig, models: Sequence[str]) -> list[EvalResult]:
    """Each model on the same `cfg.eval_dataset` prompts: greedy, plus eval_num_samples samples per prompt
    (the config's sampling settings, seed = cfg.seed) for eval/pass@k and eval/maj@k with k in eval_pass_k."""
    if cfg.eval_dataset is None:
        raise ConfigError("eval needs eval_dataset: set it in the config or with --set eval_dataset=PATH")
    funcs = resolve_rewards(cfg.reward_funcs)
    records = data_mod.dataset_records(cfg, "eval", tokenizer=transform_tokenizer(cfg))[:cfg.eval_limit]
    runner = _runner(cfg, funcs, records, "eval_reward_errors.jsonl")
    limit = cfg.eval_max_completion_length or cfg.max_completion_length
    results, kept = [], None
    try:
        for name in models:
            model_cfg = cfg.model_copy(update={"model": name})
            model, tokenizer, engine, stop_ids = _load(model_cfg)
            prompts = data_mod.tokenise_prompts(records, tokenizer, cfg.max_prompt_length, cfg.eval_dataset)
            if kept is not None and prompts.records != kept:
                raise ConfigError(f"eval --compare: '{name}' keeps different prompts under max_prompt_length="
                                  f"{cfg.max_prompt_length} than '{models[0]}' (their tokenizers differ); raise "
                                  "max_prompt_length so both models see every prompt")
            kept = prompts.records
            with torch.no_grad():
                results.append(evaluate_per_prompt(
                    engine, tokenizer, prompts, runner, cfg.eval_accuracy_reward or funcs[0].name, limit, stop_ids,
                    context={"max_completion_length": limit, "step": 0}, stop=cfg.stop_strings,
                    num_samples=cfg.eval_num_samples, pass_k=cfg.eval_pass_k,
                    sampling=eval_sampling(model_cfg, limit, stop_ids), autocast=_autocast(cfg, model)))
            engine.close()
            del model, engine
    finally:
        runner.close()
    return results


@dataclass(slots=True, kw_only=True)
class FilterReport:
    rows: list[dict]  # the original rows kept, each with `pass_rate`
    prompts: int  # prompts sampled
    all_correct: int
    all_wrong: int
    not_scored: int  # the accuracy reward applied to none of the prompt's samples


def filter_by_pass_rate(cfg: GRPOConfig, samples: int, limit: int | None = None,
                        keep_all: bool = False) -> FilterReport:
    """Sample `samples` completions per training prompt with `cfg.model` (the config's sampling settings,
    seed = cfg.seed) and keep the original rows whose pass rate is strictly between 0 and 1.

    pass_rate = samples with accuracy reward >= 1 (eval_accuracy_reward, default the first reward) / `samples`.
    A prompt whose every score is None gets pass_rate None and is dropped. With `keep_all` every row is
    kept. Rows are the dataset's own (before prompt_column, column_mapping, templates and transforms), so
    the output works as `dataset:` with the same config. Prompts over max_prompt_length are dropped.
    """
    raw_rows = data_mod.read_rows(cfg.dataset)[:limit]
    records = data_mod.dataset_records(cfg, "train", tokenizer=transform_tokenizer(cfg))[:limit]
    funcs = resolve_rewards(cfg.reward_funcs)
    name = cfg.eval_accuracy_reward or funcs[0].name
    funcs = [f for f in funcs if f.name == name]
    runner = _runner(cfg, funcs, records, "filter_reward_errors.jsonl")
    try:
        model, tokenizer, engine, stop_ids = _load(cfg)
        prompts = data_mod.tokenise_prompts(records, tokenizer, cfg.max_prompt_length, cfg.dataset)
        with torch.no_grad():
            scored = sample_and_score(engine, tokenizer, prompts, runner, samples,
                                      eval_sampling(cfg, cfg.max_completion_length, stop_ids),
                                      context={"max_completion_length": cfg.max_completion_length, "step": 0},
                                      autocast=_autocast(cfg, model))
        runner.pop_metrics()
    finally:
        runner.close()
    row_of = {id(r): i for i, r in enumerate(records)}  # tokenise_prompts keeps the record objects it does not drop
    accuracy = scored.rewards[:, 0].view(len(prompts.records), samples)  # [P, samples]
    report = FilterReport(rows=[], prompts=len(prompts.records), all_correct=0, all_wrong=0, not_scored=0)
    for record, scores in zip(prompts.records, accuracy, strict=True):
        rate = None if scores.isnan().all() else float((scores >= 1.0).sum()) / samples
        report.all_correct += int(rate == 1.0)
        report.all_wrong += int(rate == 0.0)
        report.not_scored += int(rate is None)
        if keep_all or (rate is not None and 0.0 < rate < 1.0):
            report.rows.append({**raw_rows[row_of[id(record)]], "pass_rate": rate})
    return report


def generate(cfg: GRPOConfig, n: int, limit: int | None, which: str = "train") -> list[dict]:
    """`n` sampled completions (the config's sampling settings) for the first `limit` prompts of the dataset."""
    records = data_mod.dataset_records(cfg, which, tokenizer=transform_tokenizer(cfg))
    if records is None:
        raise ConfigError("generate: the config names no eval_dataset; set one or use --split train")
    records = records[:limit]
    model, tokenizer, engine, stop_ids = _load(cfg)
    spec = cfg.dataset if which == "train" else cfg.eval_dataset
    prompts = data_mod.tokenise_prompts(records, tokenizer, cfg.max_prompt_length, spec)
    with torch.no_grad(), _autocast(cfg, model)():
        rollout = engine.generate(prompts.prompt_ids, n, eval_sampling(cfg, cfg.max_completion_length, stop_ids))
    conversational = isinstance(prompts.records[0]["prompt"], list)
    completions = decode_completions(tokenizer, rollout.completion_ids, conversational)
    return [{"prompt": prompts.records[i // n]["prompt"], "completion": c, "finish_reason": r}
            for i, (c, r) in enumerate(zip(completions, rollout.finish_reasons, strict=True))]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def default_export_dir(model_dir: Path) -> Path:
    """`grpokit export MODEL_DIR` without OUTPUT: the sibling `<model_dir>-merged`."""
    model_dir = model_dir.resolve()
    return model_dir.with_name(model_dir.name + "-merged")


def export_merged(run_model: Path, out: Path, merge: bool = True, base_model: str | None = None) -> str:
    """Save `run_model` as a plain HF model directory (safetensors weights, config, tokenizer); returns what was done.

    A full model is copied. A LoRA adapter is merged into its base (peft `merge_and_unload`, in float32, then saved
    in the base's dtype) when `merge`; without it an adapter is an error, since the result would not be a plain
    model. `base_model` replaces the adapter's `base_model_name_or_path` (a base that moved, or a hub id offline).
    The output is written to a temporary sibling and renamed, and an existing non-empty `out` is refused."""
    is_adapter = (run_model / "adapter_config.json").is_file()
    if not is_adapter and not (run_model / "config.json").is_file():
        hint = (f"; did you mean {run_model / 'final_model'}?" if (run_model / "final_model").is_dir()
                else "; give a run's final_model, best_model or checkpoint-N directory")
        raise ConfigError(f"export: '{run_model}' holds neither a LoRA adapter (adapter_config.json) nor a model "
                          f"(config.json){hint}")
    if is_adapter and not merge:
        raise ConfigError(f"export: '{run_model}' is a LoRA adapter: pass --merge to merge it into its base model "
                          "and save a full model (the adapter directory itself already loads with peft)")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"export: output '{out}' exists and is not empty; remove it or give another OUTPUT")
    tokenizer_source = run_model
    if is_adapter:
        model, base = _merged(run_model, base_model)
        if not any(run_model.glob("tokenizer*")):  # adapters saved without their tokenizer: the base's
            tokenizer_source = Path(base)
        action = f"merged the LoRA adapter into its base model {base}"
    else:
        model = load_policy(str(run_model), _saved_dtype(str(run_model)))
        action = "copied (a full model, nothing to merge)"
    tokenizer = load_tokenizer(str(tokenizer_source))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        out.rmdir()  # empty (checked above)
    tmp.rename(out)
    return action


def _merged(adapter_dir: Path, base_model: str | None, command: str = "export"):
    """The adapter merged into its base model: (model, the base's path or hub id). `command` names who asks, in
    errors (only `export` takes --base-model; elsewhere the fix is the adapter_config.json entry)."""
    from peft import PeftModel

    config_file = adapter_dir / "adapter_config.json"
    fix = ("--base-model PATH_OR_HUB_ID" if command == "export"
           else f"base_model_name_or_path in {config_file} (the base model's local directory, or a hub id online)")
    named = json.loads(config_file.read_text()).get("base_model_name_or_path")
    base = base_model or named
    if not base:
        raise ConfigError(f"{command}: {config_file} names no base_model_name_or_path; give the base model with "
                          f"{fix}")
    try:
        path = resolve_model_path(base)
        base_dtype = _saved_dtype(path)
        model = load_policy(path, torch.float32)
    except (ConfigError, OSError) as exc:
        where = "--base-model" if base_model else f"base_model_name_or_path in {config_file}"
        raise ConfigError(f"{command}: cannot load the adapter's base model '{base}' ({where}): {exc}\n  Give the "
                          f"base model's local directory (or a hub id, online) with {fix}") from None
    try:
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    except RuntimeError as exc:  # shapes that do not fit: the base is another model than the one trained
        raise ConfigError(f"{command}: the adapter in {adapter_dir} does not fit the base model '{base}' ({exc}); "
                          f"give the model the run trained with {fix}") from None
    return merged.to(base_dtype), base


def _saved_dtype(path: str) -> torch.dtype:
    """The dtype a model directory's config says its weights are in (float32 when it says nothing)."""
    from transformers import AutoConfig

    dtype = AutoConfig.from_pretrained(path).dtype
    return getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)
