"""Other tools' config keys, translated to grpokit's before validation (`translate_keys`).

Axolotl's `rl`, `trl:`, `vllm:`, `micro_batch_size`, `base_model`, `datasets:` (the first entry's `path`, and its
`type: module.fn` as `transform`), `adapter` (lora, qlora),
`bnb_config_kwargs`; TRL's `use_bnb_nested_quant` and `multi_objective_aggregation`; training-wizard's
`reward_specs`, `recipe_class`, `sample_rate`. Axolotl's `sequence_len` needs `max_completion_length`, so
`validate_config` (loading.py) translates it. Nothing here knows the schema: it maps keys, and the schema
then checks them.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any

from grpokit.errors import ConfigError

log = logging.getLogger(__name__)

# TRL's key and values for the combination strategy
_AGGREGATION = {"sum_then_normalize": "weighted_sum", "normalize_then_sum": "normalize_then_sum"}
# Axolotl's `vllm:` block -> grpokit's fields
_VLLM_KEYS = {"mode": "vllm_mode", "host": "vllm_host", "port": "vllm_port",
              "tensor_parallel_size": "vllm_tensor_parallel_size",
              "gpu_memory_utilization": "vllm_gpu_memory_utilization", "max_model_len": "vllm_max_model_len",
              "dtype": "vllm_dtype", "enable_prefix_caching": "vllm_enable_prefix_caching"}
# one key of another tool -> grpokit's key, where only the name differs
_RENAMES = {"micro_batch_size": "per_device_train_batch_size", "base_model": "model", "sft_model": "model",
            "sample_rate": "log_completions_steps", "use_bnb_nested_quant": "bnb_4bit_use_double_quant"}
# Axolotl's `adapter:` -> grpokit's keys (Axolotl's qlora also wants load_in_4bit: true, which it implies here)
_ADAPTERS = {"lora": {"use_peft": True}, "qlora": {"use_peft": True, "load_in_4bit": True}}
# Axolotl's `bnb_config_kwargs:` overrides grpokit has fields for
_BNB_KWARGS = ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant")
# the keys of an Axolotl `datasets:` entry grpokit reads; any other is an error naming it
DATASET_ENTRY_KEYS = ("path", "type", "split")


def _move(data: dict[str, Any], key: str, target: str, value: Any, where: str) -> None:
    """Put `value` (given as `key`) under grpokit's `target`; the same setting given twice differently is an error."""
    if target in data and data[target] != value:
        raise ConfigError(f"{where}: {key} and {target} are both set (to {value!r} and {data[target]!r}); give one")
    data[target] = value


def _datasets(data: dict[str, Any], entries: Any, where: str) -> None:
    """Axolotl's `datasets:` -> `dataset` (the first entry's path) and `transform` (its `type: module.fn`)."""
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: datasets: expected a non-empty list of {{path: ...}} entries")
    entry = entries[0] if isinstance(entries[0], dict) else {"path": entries[0]}
    first = entry.get("path")
    if not isinstance(first, str):
        raise ConfigError(f"{where}: datasets[0]: expected a path or a mapping with `path:`, got {entries[0]!r}")
    if len(entries) > 1:
        log.warning("%s: datasets: only the first entry (%s) is used; %d more ignored", where, first,
                    len(entries) - 1)
    unknown = sorted(set(entry) - set(DATASET_ENTRY_KEYS))
    if unknown:
        raise ConfigError(f"{where}: datasets[0].{unknown[0]}: not supported by grpokit (it reads "
                          f"{', '.join(DATASET_ENTRY_KEYS)}); load the data into a file grpokit reads, or use "
                          "column_mapping / prompt_template / transform")
    split = entry.get("split", "train")
    if split != "train":
        raise ConfigError(f"{where}: datasets[0].split: '{split}': grpokit trains on a dataset's train split; give "
                          "a file or a save_to_disk directory as 'dir:split' in `dataset`")
    _move(data, "datasets[0].path", "dataset", first, where)
    kind = entry.get("type")
    if kind is None:
        return
    if not isinstance(kind, str) or ("." not in kind and ":" not in kind):
        raise ConfigError(f"{where}: datasets[0].type: {kind!r} is not supported: grpokit applies a transform "
                          "function given as 'module.fn' or 'file.py:fn' (called fn(example, tokenizer=None) -> dict "
                          "per row); Axolotl's named prompt strategies are not built in (use prompt_template or "
                          "transform)")
    _move(data, "datasets[0].type", "transform", kind, where)
    log.info("%s: datasets[0].type '%s' is applied to each row as `transform`", where, kind)


def translate_keys(data: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """Other tools' keys (Axolotl, TRL, training-wizard, the math-QA trainer) -> grpokit's, before validation."""
    data = dict(data)
    if "trl" in data:  # Axolotl nests TRL's GRPOConfig options under `trl:`
        block = data.pop("trl") or {}
        if not isinstance(block, dict):
            raise ConfigError(f"{where}: trl: expected a mapping of TRL GRPOConfig options, got {block!r}")
        for key, value in block.items():
            _move(data, f"trl.{key}", key, value, where)
    if "rl" in data:
        rl = data.pop("rl")
        if rl != "grpo":
            raise ConfigError(f"{where}: rl: '{rl}' is not supported; grpokit trains with GRPO only (rl: grpo)")
    if "vllm" in data:
        block = data.pop("vllm") or {}
        if not isinstance(block, dict):
            raise ConfigError(f"{where}: vllm: expected a mapping (host, port, ...), got {block!r}")
        for key, value in block.items():
            if key not in _VLLM_KEYS:
                close = difflib.get_close_matches(key, _VLLM_KEYS, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"{where}: vllm.{key}: unknown key{hint} Known: {sorted(_VLLM_KEYS)}")
            _move(data, f"vllm.{key}", _VLLM_KEYS[key], value, where)
    for key, target in _RENAMES.items():
        if key in data:
            _move(data, key, target, data.pop(key), where)
    if "datasets" in data:  # Axolotl: a list of {path:, type:, ...}; grpokit trains on one dataset
        _datasets(data, data.pop("datasets"), where)
    if "reward_specs" in data:  # training-wizard: [[reward_specs]] tables with spec_class (or class) and settings
        specs = data.pop("reward_specs")
        specs = [specs] if isinstance(specs, dict) else specs
        funcs = []
        for i, spec in enumerate(specs or []):
            spec = dict(spec) if isinstance(spec, dict) else {"spec_class": spec}
            func = spec.pop("spec_class", None) or spec.pop("class", None)
            if not func:
                raise ConfigError(f"{where}: reward_specs[{i}]: needs spec_class (or class): a reward name or path")
            entry = {"func": func, **{k: spec.pop(k) for k in ("weight", "name") if k in spec}}
            funcs.append({**entry, "args": spec} if spec else entry)
        _move(data, "reward_specs", "reward_funcs", funcs, where)
    if "recipe_class" in data:
        log.info("%s: recipe_class '%s' ignored: grpokit runs its own GRPO loop", where, data.pop("recipe_class"))
    if "multi_objective_aggregation" in data:
        value = data.pop("multi_objective_aggregation")
        _move(data, "multi_objective_aggregation", "reward_combination", _AGGREGATION.get(value, value), where)
    if "adapter" in data:  # Axolotl: adapter: lora | qlora (unset: all weights train)
        adapter = data.pop("adapter")
        if adapter is not None and adapter not in _ADAPTERS:
            raise ConfigError(f"{where}: adapter: '{adapter}' is not supported; grpokit trains LoRA (adapter: lora), "
                              "QLoRA (adapter: qlora) or all weights (no adapter key)")
        for key, value in _ADAPTERS.get(adapter, {}).items():
            _move(data, f"adapter: {adapter}", key, value, where)
    if "bnb_config_kwargs" in data:  # Axolotl's overrides of its BitsAndBytesConfig
        block = data.pop("bnb_config_kwargs") or {}
        if not isinstance(block, dict) or any(k not in _BNB_KWARGS for k in block):
            raise ConfigError(f"{where}: bnb_config_kwargs: only {', '.join(_BNB_KWARGS)} are supported, "
                              f"got {block!r}")
        for key, value in block.items():
            _move(data, f"bnb_config_kwargs.{key}", key, value, where)
    return data
