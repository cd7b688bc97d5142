"""The run configuration: one typed schema, loaded from YAML or TOML, validated once.

Option names follow TRL's `GRPOConfig` wherever TRL has the option. Unknown keys are an error
with a did-you-mean; cross-field checks (batch geometry) run at load, before any model is loaded.
`--set key=value` overrides are parsed as YAML values, so numbers, booleans and lists work.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from grpokit.errors import ConfigError
from grpokit.rewards.registry import BUILTIN_REWARDS, reward_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class RewardSpec(BaseModel):
    """A `reward_funcs` entry with settings: `{func: code_tests, args: {timeout_s: 5}, weight: 1.0}`."""

    model_config = ConfigDict(extra="forbid")
    func: str = Field(description="Built-in name, 'module.function_or_Class', or 'file.py:function_or_Class'.")
    name: str | None = Field(None, description="Name in metrics and errors (default: the built-in or attribute name).")
    args: dict[str, Any] = Field(default_factory=dict, description="Constructor arguments of a class; fixed keyword arguments of a function.")
    weight: float | None = Field(None, description="This reward's weight (or use reward_weights, not both).")
    cache: bool | None = Field(None, description="Score identical (prompt, completion, row) once (default: on for expensive built-ins).")
    isolation: Literal["process", "inline"] | None = Field(None, description="'process': a killable worker with reward_timeout (default); 'inline': in the trainer process, no timeout.")


class GRPOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    # model and data
    model: str = Field("smollm2-135m-instruct", description="Hub id, local HF directory, or 'smollm2-135m-instruct' (embedded, no download).")
    dataset: str = Field("arithmetic", description="Train data: a built-in task name ('arithmetic[?key=value&...]') or a .jsonl/.json/.csv/.parquet file.")
    eval_dataset: str | None = Field(None, description="Held-out data, same forms as `dataset`; 'arithmetic:held_out' is the built-in task's fixed held-out split.")
    eval_limit: int | None = Field(None, gt=0, description="Evaluate on at most this many held-out prompts.")
    torch_dtype: Literal["float32", "bfloat16", "float16", "float64"] = Field("float32", description="dtype the policy's weights are loaded and trained in (bf16: see also `bf16` for autocast with fp32 weights).")
    use_peft: bool = Field(False, description="Train LoRA adapters (peft) instead of all weights; the reference policy is then the same model with adapters disabled.")
    lora_r: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = lora_alpha / lora_r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    lora_target_modules: list[str] | str = Field("all-linear", description="Modules that get adapters: names, or 'all-linear'.")
    prompt_column: str = Field("prompt", description="Column holding the prompt: a string, or a list of chat messages.")
    system_prompt: str | None = Field(None, description="System message prepended to conversational prompts that have none.")
    max_prompt_length: int | None = Field(512, gt=0, description="Prompts longer than this many tokens are dropped (counted and logged).")
    output_dir: str = Field("outputs/grpo", description="Run directory: config.yaml, metrics.jsonl, final_model/.")

    # rewards
    reward_funcs: list[str | RewardSpec] = Field(default_factory=lambda: ["number_correct", "answer_format"], min_length=1,
                                                 description="Reward functions: built-in names, dotted paths ('pkg.module.fn'), 'file.py:fn', or {func:, name:, args:, weight:} entries.")
    reward_weights: list[float] | None = Field(None, description="One weight per reward function (default: all 1.0).")
    reward_combination: Literal["weighted_sum", "normalize_then_sum", "gated"] = Field(
        "weighted_sum", description="weighted_sum: sum the weighted rewards, then normalise in the group; normalize_then_sum: z-score each reward in its group first (GDPO; TRL's multi_objective_aggregation); gated: like weighted_sum, but the other rewards count only where reward_gate passes.")
    reward_gate: str | None = Field(None, description="With reward_combination=gated: the reward that must pass (>= reward_gate_threshold) for the others to count, e.g. a format check in front of correctness.")
    reward_gate_threshold: float = Field(1.0, description="The gate passes where its reward is >= this.")
    reward_timeout: float | None = Field(60.0, gt=0.0, description="Seconds one reward call may take (per completion for per-sample functions) before its worker is killed and the result counts as missing; None: no limit.")
    reward_error_rate_limit: float = Field(0.1, ge=0.0, le=1.0, description="Stop the run when a reward function fails (raises, times out, returns inf) on more than this fraction of the completions it scored.")
    eval_accuracy_reward: str | None = Field(None, description="Reward whose mean is reported as eval/accuracy (default: the first).")

    # GRPO
    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (the group size G).")
    max_completion_length: int = Field(256, gt=0, description="Most tokens generated per completion.")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature for training rollouts.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0: off).")
    beta: float = Field(0.0, ge=0.0, description="KL coefficient to the reference policy (k3 estimator); 0 loads no reference.")
    epsilon: float = Field(0.2, gt=0.0, description="Lower clip range of the importance ratio (and upper, unless epsilon_high).")
    epsilon_high: float | None = Field(None, gt=0.0, description="Upper clip range (DAPO clip-higher); default: epsilon.")
    delta: float | None = Field(None, gt=1.0, description="Two-sided clipping: cap on the unclipped importance ratio (INTELLECT-2); None: no cap.")
    importance_sampling_level: Literal["token", "sequence"] = Field("token", description="Importance ratio per token (GRPO) or one per completion from its mean log-ratio (GSPO).")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field("dapo", description="Loss normalisation: grpo (per-sequence mean), bnpo/dapo (per token over the batch), dr_grpo (by batch x max_completion_length).")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="Divide advantages by the reward std of the group, of the batch, or not at all.")
    num_iterations: int = Field(1, ge=1, description="Optimizer passes over each generation (mu in the paper).")
    steps_per_generation: int | None = Field(None, gt=0, description="Micro-batches each generation fills (default: gradient_accumulation_steps); more gives several optimizer steps per generation.")
    mask_truncated_completions: bool = Field(False, description="Leave completions cut off at max_completion_length out of the loss (DAPO).")
    top_entropy_quantile: float = Field(1.0, gt=0.0, le=1.0, description="Train only on this top fraction of tokens by entropy (per micro-batch); 1.0: all tokens.")
    dynamic_sampling: bool = Field(False, description="DAPO dynamic sampling: drop groups whose rewards have zero spread and refill from fresh prompts.")
    max_resample_rounds: int = Field(3, ge=0, description="With dynamic_sampling: at most this many refill rounds per generation; then zero-spread groups fill the rest (and a warning says so).")

    # optimisation
    learning_rate: float = Field(1e-6, gt=0.0, description="AdamW peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW beta2.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = Field("constant", description="Learning-rate schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    per_device_train_batch_size: int = Field(8, gt=0, description="Completions per micro-batch.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step; one generation fills them all.")
    max_steps: int = Field(100, gt=0, description="Optimizer steps to run.")
    bf16: bool = Field(False, description="bf16 autocast for generation and the update (fp32 master weights); fast on CPUs with avx512_bf16/AMX and on recent GPUs.")
    gradient_checkpointing: bool = Field(False, description="Recompute decoder activations in backward instead of storing them (less memory, ~30% more time).")
    logprob_chunk_size: int = Field(128, gt=0, description="Tokens per chunk when computing log-probs, so [B, T, V] logits are never materialised.")
    seed: int = Field(42, description="Seed for data order, sampling and initialisation.")
    device: str | None = Field(None, description="'cpu', 'cuda', 'cuda:1', ... (default: cuda when available).")

    # evaluation and logging
    eval_on_start: bool = Field(False, description="Evaluate before the first step.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every this many steps (and always at the end when eval_dataset is set).")
    eval_max_completion_length: int | None = Field(None, gt=0, description="Token limit for evaluation (default: max_completion_length).")
    logging_steps: int = Field(1, gt=0, description="Print metrics to the console every this many steps (metrics.jsonl gets every step).")

    @property
    def micro_batches_per_generation(self) -> int:
        return self.steps_per_generation or self.gradient_accumulation_steps

    @property
    def generation_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.micro_batches_per_generation

    @property
    def prompts_per_generation(self) -> int:
        return self.generation_batch_size // self.num_generations

    @model_validator(mode="after")
    def _check_geometry(self) -> GRPOConfig:
        gbs = self.generation_batch_size
        if self.micro_batches_per_generation % self.gradient_accumulation_steps:
            raise ValueError(f"steps_per_generation = {self.steps_per_generation} must be a multiple of "
                             f"gradient_accumulation_steps = {self.gradient_accumulation_steps}")
        if gbs % self.num_generations:
            valid = [g for g in range(2, gbs + 1) if gbs % g == 0]
            raise ValueError(
                f"per_device_train_batch_size x steps_per_generation (default gradient_accumulation_steps) = {gbs} "
                f"completions per generation is not divisible by num_generations = {self.num_generations}; with this "
                f"batch, num_generations can be {valid}, or make the batch a multiple of {self.num_generations}")
        self._check_rewards()
        return self

    def _check_rewards(self) -> None:
        for i, entry in enumerate(self.reward_funcs):
            func = entry if isinstance(entry, str) else entry.func
            if "." not in func and ":" not in func and func not in BUILTIN_REWARDS:
                close = difflib.get_close_matches(func, BUILTIN_REWARDS, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"reward_funcs[{i}]: unknown reward '{func}'{hint} Built-ins: {sorted(BUILTIN_REWARDS)}; "
                                 "or give 'module.function' or 'file.py:function'")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} values but reward_funcs has "
                             f"{len(self.reward_funcs)} functions; give one weight per function")
        if self.reward_weights is not None and any(not isinstance(e, str) and e.weight is not None for e in self.reward_funcs):
            raise ValueError("weights are given both in reward_weights and in reward_funcs entries; use one place")
        names = self.reward_names
        if self.eval_accuracy_reward is not None and self.eval_accuracy_reward not in names:
            raise ValueError(f"eval_accuracy_reward '{self.eval_accuracy_reward}' is not one of the rewards {names}")
        if self.reward_combination == "gated":
            if self.reward_gate not in names:
                raise ValueError(f"reward_combination 'gated' needs reward_gate: one of the rewards {names} "
                                 f"(got {self.reward_gate!r})")
            if len(names) < 2:
                raise ValueError("reward_combination 'gated' needs a gate and at least one other reward")
        elif self.reward_gate is not None:
            raise ValueError(f"reward_gate is set but reward_combination is '{self.reward_combination}'; "
                             "set reward_combination: gated")

    @property
    def reward_names(self) -> list[str]:
        return [reward_name(e) for e in self.reward_funcs]

    @property
    def weights(self) -> list[float]:
        """One weight per reward: reward_weights, else each entry's weight (default 1.0)."""
        if self.reward_weights is not None:
            return list(self.reward_weights)
        return [1.0 if isinstance(e, str) or e.weight is None else e.weight for e in self.reward_funcs]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> GRPOConfig:
    """Read a YAML/TOML file (or nothing), apply `key=value` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_file(Path(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set '{item}': expected key=value, e.g. --set learning_rate=1e-6")
        try:
            data[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: cannot parse '{raw}' as a value ({exc.problem})") from None
    return validate_config(data, source=str(path) if path else "--set")


# TRL's key and values for the combination strategy
_AGGREGATION = {"sum_then_normalize": "weighted_sum", "normalize_then_sum": "normalize_then_sum"}


def validate_config(data: dict[str, Any], source: str = "config") -> GRPOConfig:
    data = dict(data)
    if "multi_objective_aggregation" in data and "reward_combination" not in data:
        value = data.pop("multi_objective_aggregation")
        data["reward_combination"] = _AGGREGATION.get(value, value)
    unknown = [k for k in data if k not in GRPOConfig.model_fields]
    if unknown:
        lines = []
        for key in unknown:
            close = difflib.get_close_matches(key, GRPOConfig.model_fields, n=1, cutoff=0.6)
            lines.append(f"  {key}: unknown key" + (f"; did you mean '{close[0]}'?" if close else ""))
        raise ConfigError(f"{source}: unknown config key(s):\n" + "\n".join(lines) + "\n  (`grpokit check --help-config` lists every key)")
    try:
        return GRPOConfig(**data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "config"
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {where}: {msg}" + (f" (got {err['input']!r})" if err["loc"] else ""))
        raise ConfigError(f"{source}: invalid config:\n" + "\n".join(lines)) from None


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"config file '{path}': expected a .yaml, .yml or .toml file")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file '{path}' is not valid {path.suffix[1:].upper()}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}': expected a mapping of keys to values at the top level")
    return data


def describe_fields() -> str:
    """Every key with its type, default and help, for `grpokit check --help-config`."""
    rows = []
    for name, field in GRPOConfig.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default
        rows.append(f"{name} (default {default!r}): {field.description}")
    return "\n".join(rows)
