"""Model use outside training: greedy held-out evaluation (`grpokit eval`), sampling completions
(`grpokit generate`) and merging a LoRA run into a full model (`grpokit export`).

They reuse the trainer's pieces: the config's data and rewards, the model loaders, the in-process
sampler and `evaluate.evaluate`, so a number printed here equals the trainer's eval/* metric.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from grpokit import data as data_mod
from grpokit.config import GRPOConfig
from grpokit.errors import ConfigError
from grpokit.evaluate import decode_completions, evaluate
from grpokit.models import load_policy, load_tokenizer, resolve_model_path
from grpokit.rewards import RewardRunner, resolve_rewards
from grpokit.rollout.base import SamplingParams
from grpokit.rollout.torch_engine import TorchEngine


def _load(cfg: GRPOConfig):
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path)
    model = load_policy(path, getattr(torch, cfg.torch_dtype)).to(device).eval()
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    engine = TorchEngine(model, tokenizer.pad_token_id, tokenizer=tokenizer)
    return model, tokenizer, engine, sorted({tokenizer.eos_token_id, *eos})


def evaluate_model(cfg: GRPOConfig) -> dict[str, float]:
    """eval/* metrics of `cfg.model` on `cfg.eval_dataset` (greedy, at most eval_limit prompts)."""
    if cfg.eval_dataset is None:
        raise ConfigError("eval needs eval_dataset: set it in the config or with --set eval_dataset=PATH")
    funcs = resolve_rewards(cfg.reward_funcs)
    records = data_mod.dataset_records(cfg, "eval")[:cfg.eval_limit]
    for f in funcs:
        f.check_columns(records[0].keys())
    runner = RewardRunner(funcs, timeout=cfg.reward_timeout, error_rate_limit=cfg.reward_error_rate_limit,
                          error_log=Path(cfg.output_dir) / "eval_reward_errors.jsonl")
    try:
        model, tokenizer, engine, stop_ids = _load(cfg)
        prompts = data_mod.tokenise_prompts(records, tokenizer, cfg.max_prompt_length, cfg.eval_dataset)
        limit = cfg.eval_max_completion_length or cfg.max_completion_length
        with torch.no_grad():
            return evaluate(engine, tokenizer, prompts, runner, cfg.eval_accuracy_reward or funcs[0].name, limit, stop_ids,
                            context={"max_completion_length": limit, "step": 0}, stop=cfg.stop_strings)
    finally:
        runner.close()


def generate(cfg: GRPOConfig, n: int, limit: int | None, which: str = "train") -> list[dict]:
    """`n` sampled completions (the config's sampling settings) for the first `limit` prompts of the dataset."""
    records = data_mod.dataset_records(cfg, which)
    if records is None:
        raise ConfigError("generate: the config names no eval_dataset; set one or use --split train")
    records = records[:limit]
    model, tokenizer, engine, stop_ids = _load(cfg)
    spec = cfg.dataset if which == "train" else cfg.eval_dataset
    prompts = data_mod.tokenise_prompts(records, tokenizer, cfg.max_prompt_length, spec)
    params = SamplingParams(max_tokens=cfg.max_completion_length, stop_token_ids=stop_ids, seed=cfg.seed,
                            **cfg.sampling())
    with torch.no_grad():
        rollout = engine.generate(prompts.prompt_ids, n, params)
    conversational = isinstance(prompts.records[0]["prompt"], list)
    completions = decode_completions(tokenizer, rollout.completion_ids, conversational)
    return [{"prompt": prompts.records[i // n]["prompt"], "completion": c, "finish_reason": r}
            for i, (c, r) in enumerate(zip(completions, rollout.finish_reasons, strict=True))]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def export_merged(run_model: Path, out: Path) -> str:
    """Save `run_model` (a LoRA adapter dir, or a full model) as a plain HF model dir; returns what was done."""
    if not (run_model / "adapter_config.json").is_file():
        if not (run_model / "config.json").is_file():
            raise ConfigError(f"export: '{run_model}' holds neither a LoRA adapter (adapter_config.json) nor a model "
                              "(config.json); give a run's final_model or checkpoint directory")
        model, tokenizer = load_policy(str(run_model)), load_tokenizer(str(run_model))
        action = "copied (a full model, nothing to merge)"
    else:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(run_model).merge_and_unload()
        tokenizer = load_tokenizer(str(run_model))
        action = "merged the LoRA adapters into the base model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return action
