"""Load prompt datasets and turn them into token ids.

A dataset is a built-in task (`arithmetic`, `arithmetic:held_out`, options after '?':
`arithmetic?max_terms=2&eval_size=100`) or a local .jsonl / .json / .csv / .parquet file. Every
row becomes a record: `prompt` (a string, or a list of chat messages) plus all other columns,
which reward functions receive by name. Conversational prompts are rendered with the
tokenizer's chat template; prompts longer than `max_prompt_length` tokens are dropped and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from grpokit import tasks
from grpokit.errors import DataError

log = logging.getLogger(__name__)

_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_PROMPT_FALLBACKS = ("prompt", "question", "problem")


def dataset_records(cfg, which: str = "train") -> list[dict[str, Any]] | None:
    """The train (`dataset`) or held-out (`eval_dataset`) records a config names; None when it names none."""
    spec = cfg.dataset if which == "train" else cfg.eval_dataset
    if spec is None:
        return None
    return load_records(spec, cfg.prompt_column, cfg.system_prompt)


def load_records(spec: str, prompt_column: str = "prompt", system_prompt: str | None = None) -> list[dict[str, Any]]:
    """Rows of `spec` as dicts with a `prompt` key (string or message list) and the other columns."""
    name, _, query = spec.partition("?")
    task, _, split = name.partition(":")
    if task == "arithmetic":
        rows = _arithmetic(split or "train", query, spec)
    else:
        if query:
            raise DataError(f"dataset '{spec}': options after '?' are only for built-in tasks (arithmetic)")
        rows = _read_file(spec)
    return normalise_records(rows, prompt_column, system_prompt, spec)


def _arithmetic(split: str, query: str, spec: str) -> list[dict[str, Any]]:
    known = {f.name: f.type for f in fields(tasks.ArithmeticSpec)}
    options: dict[str, Any] = {}
    size = 2000
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "size":
            size = _int_option(key, value, spec)
        elif key in known:
            options[key] = _int_option(key, value, spec)
        else:
            raise DataError(f"dataset '{spec}': unknown option '{key}'; options: size, {', '.join(known)}")
    if split not in ("train", "held_out", "test"):
        raise DataError(f"dataset '{spec}': unknown split '{split}'; use 'arithmetic' (train) or 'arithmetic:held_out'")
    try:
        train, held_out = tasks.arithmetic_splits(size, tasks.ArithmeticSpec(**options))
    except ValueError as exc:
        raise DataError(f"dataset '{spec}': {exc}") from None
    return train if split == "train" else held_out


def _int_option(key: str, value: str, spec: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"dataset '{spec}': option {key}={value!r} must be an integer") from None


def _read_file(spec: str) -> list[dict[str, Any]]:
    path = Path(spec)
    fmt = _FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"dataset '{spec}': not a built-in task and not a .jsonl/.json/.csv/.parquet file; "
                        "built-in tasks: arithmetic")
    if not path.is_file():
        raise DataError(f"dataset file '{spec}' does not exist (working directory: {Path.cwd()})")
    if path.stat().st_size == 0:
        raise DataError(f"dataset file '{spec}' is empty")
    import datasets

    try:
        table = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as exc:  # the file's content is untrusted input: report it as a data error
        raise DataError(f"dataset file '{spec}' could not be read as {fmt}: {exc}") from None
    if len(table) == 0:
        raise DataError(f"dataset file '{spec}' has no rows")
    return table.to_list()


def normalise_records(rows: list[dict[str, Any]], prompt_column: str, system_prompt: str | None, spec: str) -> list[dict[str, Any]]:
    columns = list(rows[0])
    column = prompt_column if prompt_column in columns else next((c for c in _PROMPT_FALLBACKS if c in columns), None)
    if column is None:
        raise DataError(f"dataset '{spec}' has no prompt column '{prompt_column}'; its columns are {columns}. "
                        "Set prompt_column to the column that holds the prompts.")
    records = []
    kinds = set()
    for i, row in enumerate(rows):
        prompt = row[column]
        if isinstance(prompt, str):
            kinds.add("plain")
            if system_prompt is not None:
                prompt = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
            kinds.add("chat")
            prompt = [dict(m) for m in prompt]
        else:
            raise DataError(f"dataset '{spec}', row {i}, column '{column}': expected a string or a list of "
                            f"{{role, content}} messages, got {type(prompt).__name__}")
        if system_prompt is not None and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system_prompt}, *prompt]
        records.append({**{k: v for k, v in row.items() if k != column}, "prompt": prompt})
    if len(kinds) > 1:
        raise DataError(f"dataset '{spec}', column '{column}': mixes plain-string and chat-message prompts; use one form")
    return records


@dataclass(slots=True, kw_only=True)
class TokenisedPrompts:
    records: list[dict[str, Any]]
    prompt_ids: list[list[int]]
    dropped: int


def tokenise_prompts(records: list[dict[str, Any]], tokenizer, max_prompt_length: int | None, spec: str) -> TokenisedPrompts:
    """Render and tokenise every prompt; drop (and count) those over `max_prompt_length` tokens."""
    conversational = isinstance(records[0]["prompt"], list)
    if conversational and not tokenizer.chat_template:
        raise DataError(f"dataset '{spec}' has chat-message prompts but the tokenizer has no chat template; "
                        "use plain-string prompts or a model whose tokenizer defines one")
    kept, ids, dropped = [], [], 0
    for record in records:
        if conversational:
            text = tokenizer.apply_chat_template(record["prompt"], add_generation_prompt=True, tokenize=False)
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            tokens = tokenizer(record["prompt"])["input_ids"]
        if max_prompt_length is not None and len(tokens) > max_prompt_length:
            dropped += 1
            continue
        kept.append(record)
        ids.append(tokens)
    if dropped:
        log.warning("dataset '%s': dropped %d of %d prompts longer than max_prompt_length=%s tokens",
                    spec, dropped, len(records), max_prompt_length)
    if not kept:
        raise DataError(f"dataset '{spec}': every prompt is longer than max_prompt_length={max_prompt_length} tokens; "
                        "raise max_prompt_length")
    return TokenisedPrompts(records=kept, prompt_ids=ids, dropped=dropped)
