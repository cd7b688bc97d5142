"""Loading a run configuration: layers merged, other tools' keys translated, the schema validated once.

Layers, lowest precedence first: a preset (`grpokit/config/presets/NAME.yaml`, chosen by `--preset` or a
`preset:` key), the config file (YAML or TOML), `--set`, explicit CLI options. `max_steps` and
`num_train_epochs` are alternatives: the higher layer's choice wins. `--set key=value` overrides are
parsed as YAML values, so numbers, booleans and lists work. Unknown keys are an error with a
did-you-mean; pydantic's errors are rewritten one line per key.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from pydantic import ValidationError

from grpokit.config.compat import _move, translate_keys
from grpokit.config.files import read_file
from grpokit.config.presets import load_preset
from grpokit.config.schema import GRPOConfig
from grpokit.errors import ConfigError


def load_config(path: str | Path | None, overrides: list[str] = (), *, preset: str | None = None,
                cli: dict[str, Any] | None = None, command: str = "train") -> GRPOConfig:
    """Merge preset < file < `key=value` overrides < `cli` options, translate other tools' keys, validate.

    `command` "sft": checked for `grpokit sft`, without GRPO's generation-batch rules."""
    file_data = read_file(Path(path)) if path is not None else {}
    file_preset = file_data.pop("preset", None)
    set_data: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set '{item}': expected key=value, e.g. --set learning_rate=1e-6")
        try:
            set_data[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: cannot parse '{raw}' as a value ({exc.problem})") from None
    name = preset or set_data.pop("preset", None) or file_preset
    named = [(f"preset '{name}'", load_preset(name) if name else {}), (str(path), file_data), ("--set", set_data),
             ("command line", dict(cli or {}))]
    # invalid values are reported under the file, or else the layers that gave the config
    source = str(path) if path else " + ".join(where for where, layer in named if layer) or "config"
    layers = [translate_keys(layer, where) for where, layer in named]
    if command == "sft" and layers[0]:
        layers[0] = _preset_for_sft(layers[0])
    data: dict[str, Any] = {}
    for layer in layers:
        if "max_steps" in layer and "num_train_epochs" not in layer:  # the higher layer's length wins
            data.pop("num_train_epochs", None)
        if "num_train_epochs" in layer and "max_steps" not in layer:
            data.pop("max_steps", None)
        data.update(layer)
    _batch_in_questions(data, layers, command)
    if name == "from_sft" and not any("model" in layer for layer in layers[1:]):
        raise ConfigError("preset 'from_sft' starts from a fine-tuned model: give --sft-model PATH "
                          "(or `sft_model: PATH` in the config)")
    return validate_config(data, source=source, command=command)


# a preset's keys that configure GRPO alone: `grpokit sft --config PRESET` takes SFT's own values for them (the
# math-QA trainer's SFT learns at 2e-4, its GRPO at 1e-5 to 5e-6; GRPO's 16-token completions would drop SFT targets)
_PRESET_GRPO_ONLY = ("learning_rate", "max_completion_length", "max_prompt_length", "eval_limit")


def _preset_for_sft(preset: dict[str, Any]) -> dict[str, Any]:
    """A preset's layer as `grpokit sft` takes it: without its GRPO-only keys, and writing beside its GRPO run
    (`output/grpo` -> `output/sft`, the math-QA trainer's layout) rather than into it."""
    preset = {key: value for key, value in preset.items() if key not in _PRESET_GRPO_ONLY}
    if isinstance(preset.get("output_dir"), str):
        preset["output_dir"] = str(PurePosixPath(preset["output_dir"]).parent / "sft")
    return preset


QUESTIONS = "questions"  # `cli={"per_device_train_batch_size": (QUESTIONS, N)}`: N prompts a micro-batch


def _batch_in_questions(data: dict[str, Any], layers: list[dict[str, Any]], command: str) -> None:
    """Resolve batch sizes given in questions (prompts), as the math-QA trainer counts them, into
    `per_device_train_batch_size` (completions) once `num_generations` is known from every layer:
    - the command line's `--batch-size N` (`(QUESTIONS, N)`): N x num_generations (N rows for `sft`);
    - a preset's batch, written for its own num_generations, when no higher layer sets the batch: the same number
      of questions at the num_generations a higher layer sets (`--num-samples 16` on a preset of 2 questions x 4).
    """
    generations = data.get("num_generations", GRPOConfig.model_fields["num_generations"].default)
    if isinstance(generations, str) and generations.strip().isdigit():  # YAML's "8": the value validation will take
        generations = int(generations)
    if not isinstance(generations, int) or isinstance(generations, bool):
        generations = None  # invalid: validation reports it under its key
    batch = data.get("per_device_train_batch_size")
    if isinstance(batch, tuple) and batch[0] == QUESTIONS:
        per_question = 1 if command == "sft" or generations is None else generations
        data["per_device_train_batch_size"] = batch[1] * per_question
        return
    preset = layers[0]
    if (command != "sft" and isinstance(preset.get("per_device_train_batch_size"), int)
            and isinstance(preset.get("num_generations"), int) and generations is not None
            and not any("per_device_train_batch_size" in layer for layer in layers[1:])):
        questions = max(1, preset["per_device_train_batch_size"] // preset["num_generations"])
        data["per_device_train_batch_size"] = questions * generations


def validate_config(data: dict[str, Any], source: str = "config", command: str = "train") -> GRPOConfig:
    """One merged mapping -> a GRPOConfig; unknown keys and invalid values are a ConfigError naming each key."""
    data = translate_keys(data, source)
    if "sequence_len" in data:  # Axolotl: prompt + completion tokens; grpokit limits the prompt
        total = data.pop("sequence_len")
        completion = data.get("max_completion_length", GRPOConfig.model_fields["max_completion_length"].default)
        if not isinstance(total, int) or total <= completion:
            raise ConfigError(f"{source}: sequence_len = {total!r} must be an integer above max_completion_length = "
                              f"{completion} (the prompt gets sequence_len - max_completion_length tokens)")
        _move(data, "sequence_len", "max_prompt_length", total - completion, source)
    unknown = [k for k in data if k not in GRPOConfig.model_fields]
    if unknown:
        lines = []
        for key in unknown:
            close = difflib.get_close_matches(key, GRPOConfig.model_fields, n=1, cutoff=0.6)
            lines.append(f"  {key}: unknown key" + (f"; did you mean '{close[0]}'?" if close else ""))
        raise ConfigError(f"{source}: unknown config key(s):\n" + "\n".join(lines)
                          + "\n  (`grpokit check --help-config` lists every key)")
    try:
        return GRPOConfig.model_validate(data, context={"command": command})
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid config:\n" + "\n".join(_error_lines(exc.errors()))) from None


def _error_lines(errors: list[dict]) -> list[str]:
    """One line per invalid value. Where a key's type is a union (`bf16: bool | "auto"`), pydantic reports the value
    against each member under the member's tag: a value of one member's shape (a list for `report_to`) gets that
    member's errors without the tag; any other gets one line listing what each member wants."""
    unions: dict[str, list[dict]] = {}
    for err in errors:
        loc = err["loc"]
        if len(loc) >= 2 and isinstance(loc[0], str) and _is_union(loc[0]):
            unions.setdefault(loc[0], []).append(err)
    lines, done = [], set()
    for err in errors:
        loc = err["loc"]
        key = loc[0] if loc else None
        if key in unions:
            if key not in done:
                done.add(key)
                lines += _union_lines(key, unions[key])
            continue
        where = ".".join(str(p) for p in loc) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {msg}" + (f" (got {err['input']!r})" if loc else ""))
    return lines


def _union_lines(key: str, errs: list[dict]) -> list[str]:
    deeper = [e for e in errs if len(e["loc"]) > 2]
    if deeper:
        return [f"  {'.'.join(str(p) for p in (key, *e['loc'][2:]))}: {e['msg'].removeprefix('Value error, ')} "
                f"(got {e['input']!r})" for e in deeper]
    wants = [e["msg"].removeprefix("Input should be ").split(", unable to")[0] for e in errs]
    return [f"  {key}: should be {' or '.join(dict.fromkeys(wants))} (got {errs[0]['input']!r})"]


def _is_union(key: str) -> bool:
    field = GRPOConfig.model_fields.get(key)
    return field is not None and typing.get_origin(field.annotation) in (typing.Union, types.UnionType)


def describe_fields() -> str:
    """Every key with its type, default and help, for `grpokit check --help-config`."""
    rows = []
    for name, field in GRPOConfig.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default
        rows.append(f"{name} (default {default!r}): {field.description}")
    return "\n".join(rows)
