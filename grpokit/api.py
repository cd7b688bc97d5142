"""TRL's Python API for the common subset: `GRPOConfig(**trl_args)` and `GRPOTrainer(...).train()`.

TRL code moves over by changing `from trl import GRPOConfig, GRPOTrainer` to
`from grpokit import GRPOConfig, GRPOTrainer`. Both are thin: the arguments are translated onto
grpokit's own config (`grpokit.config.schema.GRPOConfig`, validated there, so bad values get its errors)
and the run is grpokit's `Trainer`. Departures from TRL, each deliberate:

- Where TRL's default differs from grpokit's schema, the API takes TRL's: `lr_scheduler_type`
  "linear", `logging_steps` 10, `output_dir` "trainer_output". `bf16` unset is grpokit's `auto` (TRL: true
  unless `fp16` is set): on where the hardware computes bf16 natively, so a GPU or CPU without it trains in
  float32 instead of emulating bf16; with `fp16` set it is off. `args.bf16` reads True or False, what auto
  settled on this machine, as TRL's reads a bool (on a CUDA GPU once a GRPOTrainer is built on it).
- Checkpoints: `save_steps`, `save_total_limit`, `save_strategy="no"` (none), and
  `resume_from_checkpoint` (in GRPOConfig or `train(resume_from_checkpoint=True | path)`) work as in
  TRL; a grpokit checkpoint also holds the unfinished generation, so resuming repeats nothing.
  `log_completions=True` logs completions every `logging_steps` (`log_completions_steps`).
  A run already in output_dir is never written over: `train()` stops naming it, unless resuming or
  `overwrite_output_dir=True`, which moves the old run aside whole (`OUTPUT_DIR.old-<time>`).
- TRL arguments grpokit has no use for (`logging_dir`, `optim`, `remove_unused_columns`, ...)
  are accepted and a log line says they are ignored or what they map to; `push_to_hub=True`,
  `torch_compile=True` and other arguments whose silent loss would surprise are refused. Unknown
  names are refused with a did-you-mean, as TRL's dataclass refuses them.
- `num_train_epochs` (used when `max_steps` is not given, TRL's default of 3 epochs included)
  becomes `max_steps` once the dataset size is known: each generation draws
  `per_device_train_batch_size * steps_per_generation / num_generations` prompts and makes
  `num_iterations * steps_per_generation / gradient_accumulation_steps` optimizer steps, so
  `max_steps = ceil(num_train_epochs * ceil(len(train_dataset) / prompts_per_generation)) * that`
  (whole generations; config.yaml records the resolved max_steps).
  `per_device_train_batch_size` counts completions, as in TRL.
- `fp16=True` trains in float32 (grpokit has bf16 autocast only) with a warning; `warmup_ratio`
  becomes `warmup_steps`; `use_vllm` and the `vllm_*` options go to grpokit's config
  (`vllm_server_host`/`vllm_server_port` as `vllm_host`/`vllm_port`), which decides what
  `use_vllm=True` does.
- Reward callables cannot be written into config.yaml. The run directory's config records each
  as `module.qualname` (with `name:` where its metric name differs), which is where the function
  lives: importable again for module-level functions, a truthful label for `__main__` or local ones.
- A reward string that is neither a built-in nor a dotted/file path but an existing directory
  is a reward model: `{func: reward_model, args: {model: <dir>}}`.
- `callbacks`, `optimizers` and `reward_processing_classes` are not supported (an error says so).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpokit.config import GRPOConfig as RunConfig
from grpokit.config import validate_config
from grpokit.errors import ConfigError, DataError, GrpokitError
from grpokit.observe.progress import console_logging
from grpokit.rewards.registry import BUILTIN_REWARDS, reward_name

log = logging.getLogger(__name__)

# TRL arguments grpokit ignores, with why (logged when one is given a non-default value)
_IGNORED = {
    "logging_dir": "metrics go to OUTPUT_DIR/metrics.jsonl",
    "logging_strategy": "every step is written to metrics.jsonl; logging_steps sets the console rate",
    "logging_first_step": "every step is written to metrics.jsonl",
    "run_name": "the run is named by output_dir",
    "save_only_model": "checkpoints always hold the optimizer, scheduler and RNG state (exact resume)",
    "remove_unused_columns": "every dataset column reaches the reward functions by name",
    "optim": "the optimizer is torch AdamW",
    "dataloader_num_workers": "prompts are read in process",
    "dataloader_pin_memory": "prompts are read in process",
    "disable_tqdm": "grpokit prints one line per logging_steps",
    "do_train": "train() trains", "do_eval": "evaluation runs when eval_dataset is given",
    "eval_strategy": "evaluation runs every eval_steps (if set) and at the end when eval_dataset is given",
    "per_device_eval_batch_size": "evaluation generates every held-out prompt at once",
    "num_completions_to_print": "one completion is printed every log_completions_steps; all are in completions/",
    "gradient_checkpointing_kwargs": "grpokit uses use_reentrant=False",
    "ddp_find_unused_parameters": "single process", "ds3_gather_for_generation": "no DeepSpeed",
    "shuffle_dataset": "prompts are always shuffled (seeded)",
    "hub_model_id": "push_to_hub is not supported", "hub_strategy": "push_to_hub is not supported",
    "lr_scheduler_kwargs": "not supported; warmup_steps and lr_scheduler_type are", "cache_implementation": "not used",
    "generation_kwargs": "not supported; temperature, top_p, top_k are", "fp16_full_eval": "no fp16",
    "bf16_full_eval": "evaluation follows bf16",
}
# TRL arguments refused when set to anything but their harmless value
_REFUSED = {
    "push_to_hub": (False, "push_to_hub is not supported: call trainer.save_model() and upload the directory yourself"),
    "torch_compile": (False, "torch_compile is not supported; leave it False"),
    "deepspeed": (None, "DeepSpeed is not supported; grpokit runs on one device"),
    "fsdp": ("", "FSDP is not supported; grpokit runs on one device"),
}
# TRL arguments translated here (not fields of grpokit's config)
_TRANSLATED = {"num_train_epochs", "fp16", "warmup_ratio", "model_init_kwargs", "generation_batch_size",
               "scale_rewards", "save_strategy", "log_completions", "resume_from_checkpoint", "vllm_server_host",
               "vllm_server_port", "overwrite_output_dir"}
_TRAINER_ARGS = {"model": "pass the model to GRPOTrainer(model=...)",
                 "reward_funcs": "pass them to GRPOTrainer(reward_funcs=...)",
                 "dataset": "pass the data to GRPOTrainer(train_dataset=...)",
                 "eval_dataset": "pass the data to GRPOTrainer(eval_dataset=...)"}
_REWARD_KEYS = ("reward_combination", "multi_objective_aggregation", "reward_gate", "eval_accuracy_reward")
# translated here even where grpokit's config has the field: max_steps is resolved before the run starts,
# so config.yaml records the steps actually run
_OWN_TRANSLATION = {"num_train_epochs", "scale_rewards"}
# TRL's defaults where grpokit's schema has another (TRL inherits lr_scheduler_type from transformers'
# TrainingArguments; it sets logging_steps 10; its bf16 = not fp16 becomes bf16 auto unless fp16 is set)
_TRL_DEFAULTS = {"num_train_epochs": 3.0, "output_dir": "trainer_output", "lr_scheduler_type": "linear",
                 "logging_steps": 10}


class GRPOConfig:
    """TRL's `GRPOConfig` for the common subset; grpokit's validated config is `.run_config`.

    Attributes read like TRL's (`args.learning_rate`); `max_steps` is -1 until the trainer
    resolves `num_train_epochs` against the dataset.
    """

    def __init__(self, **kwargs: Any):
        console_logging(unless_configured=True)  # the notes below, and the run's lines, print as the CLI's do
        unknown = [k for k in kwargs if k not in RunConfig.model_fields and k not in _IGNORED
                   and k not in _REFUSED and k not in _TRANSLATED and k != "multi_objective_aggregation"]
        if unknown:
            known = [*RunConfig.model_fields, *_IGNORED, *_REFUSED, *_TRANSLATED]
            lines = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                lines.append(f"  {key}: unknown argument" + (f"; did you mean '{close[0]}'?" if close else ""))
            raise ConfigError("GRPOConfig: unknown argument(s):\n" + "\n".join(lines))
        for key in sorted(set(kwargs) & set(_TRAINER_ARGS)):
            raise ConfigError(f"GRPOConfig: {key} is not a GRPOConfig argument; {_TRAINER_ARGS[key]}")
        for key, (harmless, why) in _REFUSED.items():
            if key in kwargs and kwargs[key] not in (harmless, None, False, ""):
                raise ConfigError(f"GRPOConfig: {why} (got {key}={kwargs[key]!r})")
        for key in sorted(set(kwargs) & set(_IGNORED) - set(RunConfig.model_fields)):
            log.warning("GRPOConfig: %s=%r is ignored: %s", key, kwargs[key], _IGNORED[key])
        self.trl_args = dict(kwargs)
        # whatever grpokit's config has passes straight through (and is validated there)
        settings = {k: v for k, v in kwargs.items() if k not in _OWN_TRANSLATION
                    and (k in RunConfig.model_fields or k == "multi_objective_aggregation")}
        for key in ("output_dir", "lr_scheduler_type", "logging_steps"):
            settings.setdefault(key, _TRL_DEFAULTS[key])
        if settings.get("bf16", None) is None:  # unset, or TRL's None ("not set")
            settings["bf16"] = False if kwargs.get("fp16") else "auto"
        max_steps = settings.pop("max_steps", -1)
        self.num_train_epochs = float(kwargs.get("num_train_epochs", _TRL_DEFAULTS["num_train_epochs"]))
        if self.num_train_epochs <= 0 and max_steps in (None, -1):
            raise ConfigError(f"GRPOConfig: num_train_epochs must be > 0 when max_steps is not set "
                              f"(got {self.num_train_epochs})")
        if max_steps not in (None, -1):
            settings["max_steps"] = max_steps
            if "num_train_epochs" in kwargs:
                log.info("GRPOConfig: max_steps=%s is given, so num_train_epochs is ignored (as in TRL)", max_steps)
        settings.update(self._translate(kwargs, settings))
        self._quantization = settings.pop("_quantization", {})
        self.reward_weights = settings.pop("reward_weights", None)
        # checked against the reward functions, which only the trainer knows
        self._reward_settings = {k: settings.pop(k) for k in _REWARD_KEYS if k in settings}
        # args.bf16 a bool, as TRL's (on a GPU once the trainer has settled it: asking the GPU starts CUDA, and the
        # trainer's reward workers fork first)
        self.run_config = validate_config(settings, source="GRPOConfig").settle_auto(cuda=False)
        if self.reward_weights is not None and not all(isinstance(w, (int, float)) for w in self.reward_weights):
            raise ConfigError(f"GRPOConfig: reward_weights must be numbers (got {self.reward_weights!r})")
        self._max_steps_given = "max_steps" in settings

    @classmethod
    def from_run_config(cls, run: RunConfig) -> GRPOConfig:
        """The API's config over grpokit's own (`grpokit.config.load_config(...)`, a preset): its values as they are,
        no TRL defaults; its `num_train_epochs` resolved against the dataset as the API resolves TRL's."""
        self = cls.__new__(cls)
        data = run.model_dump(exclude_unset=True)
        self.trl_args = {}
        self._quantization = {}
        self.reward_weights = data.pop("reward_weights", None)
        self._reward_settings = {k: data.pop(k) for k in _REWARD_KEYS if k in data}
        epochs = data.pop("num_train_epochs", None)
        self._max_steps_given = epochs is None
        self.num_train_epochs = float(epochs or 0)
        self.run_config = validate_config(data, source="config").settle_auto(cuda=False)
        return self

    @staticmethod
    def _translate(kwargs: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if kwargs.get("fp16"):
            log.warning("GRPOConfig: fp16=True: grpokit has no fp16 mixed precision; training in %s "
                        "(bf16=True gives bf16 autocast)", "bf16 autocast" if kwargs.get("bf16") is True else "float32")
        if kwargs.get("warmup_ratio"):
            if "warmup_steps" in kwargs:
                raise ConfigError("GRPOConfig: give warmup_steps or warmup_ratio, not both")
        init_kwargs = dict(kwargs.get("model_init_kwargs") or {})
        dtype = init_kwargs.pop("torch_dtype", init_kwargs.pop("dtype", None))
        if dtype is not None and dtype != "auto":
            out["torch_dtype"] = str(dtype).removeprefix("torch.")
        quantization = init_kwargs.pop("quantization_config", None)
        if quantization is not None:  # applied in resolved(), where the trainer's peft_config says whether LoRA trains
            out["_quantization"] = _four_bit_settings(quantization)
        if init_kwargs:
            log.warning("GRPOConfig: model_init_kwargs %s are ignored (torch_dtype and quantization_config are used)",
                        sorted(init_kwargs))
        if kwargs.get("generation_batch_size") is not None:
            if "steps_per_generation" in kwargs:
                raise ConfigError("GRPOConfig: give generation_batch_size or steps_per_generation, not both")
            size = settings.get("per_device_train_batch_size",
                                RunConfig.model_fields["per_device_train_batch_size"].default)
            if kwargs["generation_batch_size"] % size:
                raise ConfigError(f"GRPOConfig: generation_batch_size={kwargs['generation_batch_size']} must be a "
                                  f"multiple of per_device_train_batch_size={size}")
            out["steps_per_generation"] = kwargs["generation_batch_size"] // size
        if kwargs.get("save_strategy", "steps") == "no":
            out["save_steps"] = None
        elif kwargs.get("save_strategy", "steps") != "steps":
            log.info("GRPOConfig: save_strategy=%r: grpokit checkpoints every save_steps steps",
                     kwargs["save_strategy"])
        if kwargs.get("log_completions"):
            out["log_completions_steps"] = settings.get("logging_steps", _TRL_DEFAULTS["logging_steps"])
        for trl_key, key in (("vllm_server_host", "vllm_host"), ("vllm_server_port", "vllm_port")):
            if trl_key in kwargs:
                out[key] = kwargs[trl_key]
        if isinstance(kwargs.get("scale_rewards"), bool):  # TRL's older boolean form
            out["scale_rewards"] = "group" if kwargs["scale_rewards"] else "none"
        elif "scale_rewards" in kwargs:
            out["scale_rewards"] = kwargs["scale_rewards"]
        return out

    @property
    def max_steps(self) -> int:
        return self.run_config.max_steps if self._max_steps_given else -1

    def __getattr__(self, name: str) -> Any:  # TRL-style reads: args.learning_rate, args.report_to
        if name in RunConfig.model_fields:
            return getattr(self.__dict__["run_config"], name)
        if name in self.__dict__.get("trl_args", {}):
            return self.trl_args[name]
        raise AttributeError(f"GRPOConfig has no attribute '{name}'")

    def resolved(self, num_prompts: int, reward_funcs: list, reward_weights: list[float] | None,
                 model_name: str, *, recorded: dict[str, Any] | None = None) -> RunConfig:
        """grpokit's config for a run on `num_prompts` prompts with these rewards and this model; `recorded`: what the
        trainer's own arguments set (the LoRA settings of a peft_config, an in-memory dataset's description)."""
        data = self.run_config.model_dump(exclude_unset=True)
        data.update({key: "auto" for key in self.run_config.settled_from_auto})  # the run settles them itself (and
        # a resumed one takes its checkpoint's values)
        data.update(self._reward_settings, reward_funcs=reward_funcs, reward_weights=reward_weights, model=model_name)
        data.update(recorded or {})
        data.update(self._quantization)
        cfg = validate_config(data, source="GRPOConfig")
        if not self._max_steps_given:
            per_generation = cfg.num_iterations * cfg.micro_batches_per_generation // cfg.gradient_accumulation_steps
            generations = math.ceil(self.num_train_epochs * math.ceil(num_prompts / cfg.prompts_per_generation))
            cfg.max_steps = max(1, generations * per_generation)
            log.info("GRPOTrainer: %s epoch(s) of %d prompts at %d prompts per generation -> max_steps=%d",
                     self.num_train_epochs, num_prompts, cfg.prompts_per_generation, cfg.max_steps)
        ratio = self.trl_args.get("warmup_ratio")
        if ratio:
            cfg.warmup_steps = math.ceil(ratio * cfg.max_steps)
        return cfg

    def __repr__(self) -> str:
        return f"GRPOConfig({', '.join(f'{k}={v!r}' for k, v in self.trl_args.items())})"


@dataclass(slots=True, kw_only=True)
class TrainOutput:
    """What TRL's `train()` returns (global_step, training_loss, metrics), plus grpokit's run facts."""

    global_step: int
    training_loss: float
    metrics: dict[str, float]
    output_dir: Path
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None


class GRPOTrainer:
    """TRL's `GRPOTrainer` signature over grpokit's Trainer; the model loads here, as in TRL."""

    def __init__(self, model=None, reward_funcs=None, args: GRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None, peft_config=None,
                 callbacks=None, optimizers=(None, None), reward_weights: list[float] | None = None, *,
                 config: RunConfig | GRPOConfig | None = None, reward_model=None):
        """TRL's arguments; or the math-QA trainer's `GRPOTrainer(config=..., reward_model=...)`, where `config` is
        grpokit's config (`grpokit.config.load_config(...)`, e.g. a preset) or an API GRPOConfig and names the model
        and the data unless `model` / `train_dataset` are given, and `reward_model` is a `grpokit.RewardModel` (or
        any reward) used in place of `reward_funcs`."""
        console_logging(unless_configured=True)  # per-step lines on the console and in training_log.txt, as the CLI
        args, model, reward_funcs, train_dataset, eval_dataset = _math_qa_arguments(
            args, config, model, reward_funcs, reward_model, train_dataset, eval_dataset)
        for name, value in (("callbacks", callbacks), ("reward_processing_classes", reward_processing_classes)):
            if value is not None:
                raise GrpokitError(f"GRPOTrainer: {name} is not supported; leave it None (metrics are in "
                                   "OUTPUT_DIR/metrics.jsonl; reward models load their own tokenizer)")
        if optimizers is not None and any(o is not None for o in optimizers):
            raise GrpokitError("GRPOTrainer: optimizers is not supported; grpokit uses AdamW with learning_rate, "
                               "weight_decay, adam_beta1/2, lr_scheduler_type and warmup_steps from GRPOConfig")
        if train_dataset is None:
            raise DataError("GRPOTrainer: train_dataset is required (a datasets.Dataset or a list of dicts "
                            "with a 'prompt' column)")
        self.args = args if args is not None else GRPOConfig()
        if not isinstance(self.args, GRPOConfig):
            raise ConfigError(f"GRPOTrainer: args must be grpokit.GRPOConfig, got {type(self.args).__name__}; "
                              "import GRPOConfig from grpokit, not trl")
        run = self.args.run_config
        train_records = _records(train_dataset, run, "train_dataset")
        eval_records = _records(eval_dataset, run, "eval_dataset") if eval_dataset is not None else None
        entries, config_entries = _reward_entries(reward_funcs)
        weights = _weights(self.args.reward_weights, reward_weights, len(entries))
        model_name = model if isinstance(model, str) else getattr(model, "name_or_path", "") or "in-memory model"
        cfg = self.args.resolved(len(train_records), config_entries, weights, model_name,
                                 recorded=_recorded_settings(train_dataset, train_records, peft_config, model))
        if processing_class is None and not isinstance(model, str):
            if not getattr(model, "name_or_path", ""):
                raise ConfigError("GRPOTrainer: the model object has no name_or_path to load its tokenizer from; "
                                  "pass processing_class=tokenizer")
            from grpokit.models.loading import load_tokenizer

            processing_class = load_tokenizer(model.name_or_path)
        from grpokit.train.trainer import Trainer

        self._trainer = Trainer(cfg, train_records=train_records, eval_records=eval_records,
                                model=None if isinstance(model, str) else model, tokenizer=processing_class,
                                reward_funcs=entries, peft_config=peft_config)
        self.args.run_config.take_settled(self._trainer.cfg)  # on a GPU, args.bf16 reads a bool from here on
        self._trained = False

    @property
    def model(self):
        return self._trainer.policy

    @property
    def processing_class(self):
        return self._trainer.tokenizer

    @property
    def config(self) -> RunConfig:
        """grpokit's resolved config for this run (what OUTPUT_DIR/config.yaml holds)."""
        return self._trainer.cfg

    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainOutput:
        """Run the training; `resume_from_checkpoint` (here or in GRPOConfig): True for the newest checkpoint
        in output_dir, or a checkpoint directory."""
        if self._trained:  # the reward workers are closed at the end of a run
            raise GrpokitError("GRPOTrainer.train() was already called; build a new GRPOTrainer for another run")
        self._trained = True
        if resume_from_checkpoint is None:
            resume_from_checkpoint = self.args.trl_args.get("resume_from_checkpoint")
        result = self._trainer.train(resume=resume_from_checkpoint or None,
                                     overwrite=bool(self.args.trl_args.get("overwrite_output_dir")))
        steps = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
        losses = [m["loss"] for m in steps if m.get("loss") is not None]
        last = next((m for m in reversed(steps) if "loss" in m), {})
        return TrainOutput(global_step=result.steps,
                           training_loss=sum(losses) / len(losses) if losses else float("nan"),
                           metrics={k: v for k, v in last.items() if k not in ("step", "timestamp")},
                           output_dir=result.output_dir,
                           eval_before=result.eval_before, eval_after=result.eval_after)

    def save_model(self, output_dir: str | Path | None = None) -> None:
        """The model (adapters only with LoRA) and tokenizer into `output_dir` (default: args.output_dir)."""
        path = Path(output_dir if output_dir is not None else self._trainer.cfg.output_dir)
        self._trainer.policy.save_pretrained(path)
        self._trainer.tokenizer.save_pretrained(path)


def _four_bit_settings(quantization: Any) -> dict[str, Any]:
    """model_init_kwargs' quantization_config (a BitsAndBytesConfig or its dict) -> grpokit's 4-bit keys, or a clear
    error for what grpokit does not run (8-bit, other quantisation methods)."""
    data = quantization.to_dict() if hasattr(quantization, "to_dict") else quantization
    if not isinstance(data, dict):
        raise ConfigError(f"GRPOConfig: model_init_kwargs quantization_config must be a BitsAndBytesConfig or its "
                          f"dict, got {type(quantization).__name__}")
    method = data.get("quant_method", "bitsandbytes")
    method = str(getattr(method, "value", method)).lower()  # transformers' QuantizationMethod enum, or its string
    if method != "bitsandbytes" or data.get("load_in_8bit") or not data.get("load_in_4bit"):
        raise ConfigError("GRPOConfig: model_init_kwargs quantization_config: grpokit loads bitsandbytes 4-bit "
                          "weights only (BitsAndBytesConfig(load_in_4bit=True, ...), QLoRA with a peft_config); "
                          f"got {method}{' 8-bit' if data.get('load_in_8bit') else ''}. Drop it to train in full "
                          "precision")
    settings = {"load_in_4bit": True}
    if "bnb_4bit_quant_type" in data:
        settings["bnb_4bit_quant_type"] = data["bnb_4bit_quant_type"]
    if "bnb_4bit_use_double_quant" in data:
        settings["bnb_4bit_use_double_quant"] = bool(data["bnb_4bit_use_double_quant"])
    log.info("GRPOConfig: quantization_config -> load_in_4bit (%s)",
             ", ".join(f"{k}={v}" for k, v in settings.items() if k != "load_in_4bit") or "defaults")
    return settings


def _recorded_settings(train_dataset, train_records: list[dict], peft_config, model) -> dict[str, Any]:
    """What config.yaml should say of the trainer's own arguments: the LoRA settings of a peft_config (or of a
    PeftModel passed as the model) and an in-memory dataset's size and columns."""
    out: dict[str, Any] = {}
    if not isinstance(train_dataset, _Loaded):
        kind = type(train_dataset).__name__
        out["dataset"] = f"in-memory {kind}: {len(train_records)} rows, columns {', '.join(train_records[0])}"
    lora = peft_config
    if lora is None and hasattr(model, "peft_config"):  # a PeftModel: its active adapter's settings
        configs = model.peft_config
        lora = configs.get(getattr(model, "active_adapter", "default")) or next(iter(configs.values()), None)
    if lora is not None:
        out["use_peft"] = True
        for key, attr in (("lora_r", "r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout")):
            if getattr(lora, attr, None) is not None:
                out[key] = getattr(lora, attr)
        targets = getattr(lora, "target_modules", None)
        if targets is not None:
            out["lora_target_modules"] = targets if isinstance(targets, str) else sorted(targets)
    return out


class _Loaded(list):
    """Records grpokit's data loading made from a config (prompts rendered, columns mapped): used as they are."""


def _records(dataset, run: RunConfig, what: str) -> list[dict]:
    from grpokit.data.loading import normalise_records

    if isinstance(dataset, _Loaded):
        return list(dataset)
    return normalise_records(_rows(dataset, what), run.prompt_column, run.system_prompt, what)


def _math_qa_arguments(args, config, model, reward_funcs, reward_model, train_dataset, eval_dataset):
    """TRL's (args, model, reward_funcs, datasets) from `config=` / `reward_model=` where given (GRPOTrainer)."""
    if config is not None:
        if args is not None:
            raise ConfigError("GRPOTrainer: give args (TRL's) or config (the math-QA trainer's), not both")
        if isinstance(config, RunConfig):
            args = GRPOConfig.from_run_config(config)
        elif isinstance(config, GRPOConfig):
            args = config
        else:
            raise ConfigError(f"GRPOTrainer: config must be grpokit's config (grpokit.config.load_config) or "
                              f"grpokit.GRPOConfig, got {type(config).__name__}")
    if reward_model is not None:
        if reward_funcs is not None:
            raise ConfigError("GRPOTrainer: give reward_funcs or reward_model, not both")
        reward_funcs = [reward_model]
    run = args.run_config if args is not None else None
    if config is not None:  # grpokit's config names the model, the data and (without reward_model) the rewards
        model = model if model is not None else run.model
        if train_dataset is None:
            from grpokit.data import loading as data_mod

            train_dataset = _Loaded(data_mod.dataset_records(run, "train"))
            if eval_dataset is None and run.eval_dataset:
                eval_dataset = _Loaded(data_mod.dataset_records(run, "eval"))
        if reward_funcs is None:
            reward_funcs = [e if isinstance(e, str) else e.model_dump(exclude_none=True) for e in run.reward_funcs]
    if model is None:
        raise ConfigError("GRPOTrainer: model is required (a hub id, a directory or a loaded model), or give "
                          "config=... naming one")
    if reward_funcs is None:
        raise ConfigError("GRPOTrainer: reward_funcs is required (or reward_model=..., or config=... naming them)")
    return args, model, reward_funcs, train_dataset, eval_dataset


def _rows(dataset, what: str) -> list[dict]:
    if isinstance(dataset, list):
        rows = dataset
    elif hasattr(dataset, "to_list"):  # datasets.Dataset
        rows = dataset.to_list()
    else:
        raise DataError(f"GRPOTrainer: {what} must be a datasets.Dataset or a list of dicts, "
                        f"got {type(dataset).__name__}")
    if not rows:
        raise DataError(f"GRPOTrainer: {what} is empty")
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"GRPOTrainer: {what} must hold dicts (one per row)")
    return rows


def _reward_entries(reward_funcs) -> tuple[list, list]:
    """(what the Trainer resolves, what config.yaml records) for each reward."""
    funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not funcs:
        raise ConfigError("GRPOTrainer: reward_funcs is empty; give at least one reward function")
    entries, recorded = [], []
    for i, func in enumerate(funcs):
        if isinstance(func, str):
            is_path = func not in BUILTIN_REWARDS and Path(func).is_dir()
            entry = {"func": "reward_model", "name": Path(func).name, "args": {"model": func}} if is_path else func
            entries.append(entry)
            recorded.append(entry)
        elif isinstance(func, dict):  # a config's reward entry: {func:, name:, args:, weight:, ...}
            entries.append(func)
            recorded.append(func)
        elif callable(func) or callable(getattr(func, "compute_reward", None)):  # RewardSpec / RewardModel objects
            entries.append(func)
            target = func if hasattr(func, "__qualname__") else type(func)
            dotted = f"{target.__module__}.{target.__qualname__}"
            name = reward_name(func)
            recorded.append(dotted if reward_name(dotted) == name else {"func": dotted, "name": name})
        else:
            raise ConfigError(f"GRPOTrainer: reward_funcs[{i}] is a {type(func).__name__}; give a function, a "
                              "built-in name, 'module.function', 'file.py:function' or a reward model directory")
    return entries, recorded


def _weights(from_args: list[float] | None, from_trainer: list[float] | None, count: int) -> list[float] | None:
    if from_args is not None and from_trainer is not None and list(from_args) != list(from_trainer):
        raise ConfigError(f"GRPOTrainer: reward_weights differ between GRPOConfig ({list(from_args)}) and the "
                          f"GRPOTrainer argument ({list(from_trainer)}); give them in one place")
    weights = from_trainer if from_trainer is not None else from_args
    if weights is not None and len(weights) != count:
        raise ConfigError(f"GRPOTrainer: reward_weights has {len(weights)} values but there are {count} reward "
                          "functions; give one weight per function")
    return None if weights is None else [float(w) for w in weights]
