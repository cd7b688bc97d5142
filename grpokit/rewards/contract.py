"""The reward contract: how a user's function, class or async function is bound and called.

TRL's contract is the base: `f(prompts, completions, **kwargs) -> list[float | None]`, kwargs
carrying every dataset column, `completion_ids` and the run context (`max_completion_length`,
`step`, `trainer_state`). Everything else binds by parameter name, so the signatures users
bring from other tools run unchanged:

- batch functions without `**kwargs` get just the arguments they name; `answer`, `answers`,
  `labels`, `references`, `ground_truth` and `solution` also bind to the dataset's reference
  column under another name, `questions` to the prompts, and `context` to the run context as a dict;
- a `prompts` / `completions` (or per-sample `completion`, ...) parameter annotated for strings (`List[str]`,
  `list[str]`, `Sequence[str]`; `str` per sample) gets the texts (a chat message list's last content), as
  written for it; unannotated, chat prompts and completions come as message lists (TRL's conversational form);
- per-sample functions, marked with `@per_sample`: `f(completion, answer) -> float`, one call
  per completion with each column's value for that row (`generated`, `response` and `output`
  also name the completion, `question` the prompt);
- `async def` functions (and async `__call__`): run on an event loop; per-sample ones
  concurrently;
- a function whose first parameter names one completion (`completion`, `generated`,
  `generated_code`, `response`, `output`) and that has no `completions` parameter is per-sample
  without the decorator (`def reward(generated, ground_truth)`);
- instances of classes with `__call__`, bound like functions;
- objects with `compute_reward` (subclasses of `grpokit.RewardSpec` or `grpokit.RewardModel`, or
  any object that has the method and no `__call__`): the method is bound by parameter name, never
  by position, with the names of both tools: TRL's (`prompts`, `completions`, columns, `**kwargs`)
  and the math-QA trainer's (`questions` = the prompt texts, `answers` = the completion texts,
  `references` = the reference column). Values the object gives `self.log_metrics` are logged
  as `rewards/<name>/<key>` (spec.py).

`test_cases` also binds to a `tests` column (and `tests` to a `test_cases` column).

Results are checked here: a tensor, array or list of one float (or None / NaN = "not
applicable") per completion. A wrong length or type is a `RewardError` naming the function.
Where the function runs (a killable worker or in-process), timeouts and exception counting
are the runner's (runner.py).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from grpokit.errors import RewardError

REFERENCE_ALIASES = ("answer", "answers", "labels", "label", "references", "reference", "ground_truth", "solution")
SAMPLE_REFERENCE_ALIASES = ("answer", "label", "reference", "ground_truth", "solution")
SAMPLE_COMPLETION_ALIASES = ("completion", "generated", "generated_code", "response", "output")
COLUMN_ALIASES = {"test_cases": "tests", "tests": "test_cases"}  # a parameter name -> the column it also binds to
CONTEXT_KEYS = ("max_completion_length", "step", "trainer_state")


def per_sample(fn: Callable) -> Callable:
    """Mark `f(completion, answer, ...) -> float | None` as scoring one completion per call."""
    fn.__grpokit_per_sample__ = True
    return fn


@dataclass(slots=True, kw_only=True)
class RewardBatch:
    """What a reward sees for N completions; every column list is aligned with `completions`."""

    prompts: list
    completions: list
    completion_ids: list[list[int]]
    columns: dict[str, list]
    context: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completions)

    def select(self, rows: Sequence[int]) -> RewardBatch:
        return RewardBatch(prompts=[self.prompts[i] for i in rows], completions=[self.completions[i] for i in rows],
                           completion_ids=[self.completion_ids[i] for i in rows],
                           columns={k: [v[i] for i in rows] for k, v in self.columns.items()}, context=self.context)

    def reference(self) -> list | None:
        return next((self.columns[k] for k in REFERENCE_ALIASES if k in self.columns), None)


def decode_completions(tokenizer, completion_ids: list[list[int]], conversational: bool) -> list:
    """Completion texts, or TRL's message-list form for conversational prompts."""
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts


def columns_of(records: list[dict], repeat: int) -> dict[str, list]:
    """Dataset columns, each value repeated for the `repeat` completions of its prompt."""
    return {key: [r[key] for r in records for _ in range(repeat)] for key in records[0]}


def text_of(message_or_text: Any) -> str:
    """The text of a prompt or completion: a string, or the last message of a chat list."""
    if isinstance(message_or_text, list) and message_or_text and isinstance(message_or_text[-1], dict):
        return str(message_or_text[-1].get("content", ""))
    return str(message_or_text)


_TEXT_PARAMS = ("prompts", "completions", "questions", "prompt", "question", *SAMPLE_COMPLETION_ALIASES)
_TEXT_LISTS = ("List[str]", "list[str]", "Sequence[str]", "Iterable[str]", "typing.List[str]",
               "collections.abc.Sequence[str]", "collections.abc.Iterable[str]")


def _annotated_text(annotation: Any) -> Literal["one", "list"] | None:
    """What a parameter's annotation asks for: "one" string (`str`), a "list" of strings (`List[str]`,
    `list[str]`, `Sequence[str]`, `Iterable[str]`; also as the strings postponed annotations leave), or None."""
    if isinstance(annotation, str):  # 'Optional[X]', 'X | None' and 'None | X' read as X
        written = annotation.replace(" ", "").replace("|None", "").replace("None|", "")
        if written.startswith(("Optional[", "typing.Optional[")) and written.endswith("]"):
            written = written[written.index("[") + 1:-1]
        return "one" if written == "str" else "list" if written in _TEXT_LISTS else None
    if annotation is str:
        return "one"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
        return _annotated_text(next(a for a in args if a is not type(None)))
    return "list" if origin in (list, Sequence, Iterable) and args == (str,) else None


def _completion_first(fn: Callable) -> bool:
    """`f(generated, ground_truth)`: the first parameter names one completion and none names them all."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return bool(params) and params[0] in SAMPLE_COMPLETION_ALIASES and "completions" not in params


def _compute_reward_of(obj: Any) -> Callable | None:
    """The bound `compute_reward` of a RewardSpec / RewardModel-style object, or None for anything else."""
    from grpokit.rewards.spec import RewardModel, RewardSpec

    method = getattr(obj, "compute_reward", None)
    if not callable(method) or inspect.isroutine(obj) or inspect.isclass(obj):
        return None
    for base in (RewardSpec, RewardModel):
        if isinstance(obj, base) and getattr(type(obj), "compute_reward", None) is base.compute_reward:
            raise RewardError(f"reward '{type(obj).__name__}' subclasses grpokit.{base.__name__} but does not "
                              f"implement compute_reward{inspect.signature(base.compute_reward)}")
    return method if isinstance(obj, (RewardSpec, RewardModel)) or not callable(obj) else None


@dataclass(slots=True, kw_only=True)
class RewardFunction:
    """One reward: the callable, how it binds, and how the runner should treat it."""

    name: str
    fn: Callable[..., Any]
    per_sample: bool = False
    expensive: bool = False  # identical (prompt, completion, row) inputs are scored once
    isolation: Literal["process", "inline"] = "process"
    is_async: bool = False
    compute_reward: bool = False  # a compute_reward method: the math-QA names bind too (module docstring)
    source: Any = None  # the object given (for close())

    @classmethod
    def wrap(cls, name: str, obj: Any, *, expensive: bool | None = None,
             isolation: str | None = None) -> RewardFunction:
        fn = _compute_reward_of(obj)
        if fn is None and not callable(obj):
            raise RewardError(f"reward '{name}' is a {type(obj).__name__}, which is neither callable nor has "
                              "a compute_reward method (subclass grpokit.RewardSpec or grpokit.RewardModel)")
        method = fn is not None
        fn = fn or obj
        call = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else getattr(fn, "__call__", fn)
        marked = bool(getattr(obj, "__grpokit_per_sample__", False) or getattr(obj, "per_sample", False) is True)
        return cls(name=name, fn=fn, per_sample=marked or (not method and _completion_first(fn)),
                   expensive=bool(getattr(obj, "expensive", False)) if expensive is None else expensive,
                   isolation=isolation or getattr(obj, "isolation", "process"),
                   is_async=inspect.iscoroutinefunction(call), compute_reward=method, source=obj)

    def take_logged_metrics(self) -> dict[str, list[float]]:
        """What the reward gave `log_metrics` since the last call (RewardSpec / RewardModel subclasses), emptied."""
        take = getattr(self.source, "take_logged_metrics", None)
        return take() if callable(take) else {}

    # ---- binding -------------------------------------------------------------------------------
    def _params(self) -> dict[str, inspect.Parameter]:
        params = dict(inspect.signature(self.fn).parameters)
        for name, p in params.items():
            if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY):
                raise RewardError(f"reward function '{self.name}': positional-only or *args parameter '{name}' "
                                  "cannot be bound by name; use named parameters such as "
                                  "(prompts, completions, **kwargs)")
        return params

    def _bind_from(self, available: dict[str, Any], aliases: dict[str, Any]) -> dict[str, Any]:
        params = self._params()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            bound = dict(available)
            bound.update({name: aliases[name] for name in params if name not in bound and name in aliases})
            return self._as_annotated(bound, params)
        bound = {}
        for name, p in params.items():
            if name in available:
                bound[name] = available[name]
            elif name in aliases:
                bound[name] = aliases[name]
            elif p.default is inspect.Parameter.empty:
                raise RewardError(f"reward function '{self.name}' needs argument '{name}', which matches no dataset "
                                  f"column; columns: {sorted(k for k in available if k not in CONTEXT_KEYS)}")
        return self._as_annotated(bound, params)

    @staticmethod
    def _as_annotated(bound: dict[str, Any], params: dict[str, inspect.Parameter]) -> dict[str, Any]:
        """Prompts and completions as texts where the function's annotation asks for strings (`completions:
        List[str]`, a per-sample `completion: str`): chat prompts and completions arrive as message lists (TRL's
        conversational form) otherwise, and a function written for strings would fail on them."""
        for name in _TEXT_PARAMS:
            if name not in bound or name not in params:
                continue
            wanted = _annotated_text(params[name].annotation)
            if wanted == "list" and isinstance(bound[name], list):
                bound[name] = [text_of(value) for value in bound[name]]
            elif wanted == "one":
                bound[name] = text_of(bound[name])
        return bound

    def bind(self, batch: RewardBatch) -> dict[str, Any]:
        available = {"prompts": batch.prompts, "completions": batch.completions,
                     "completion_ids": batch.completion_ids, **batch.context}
        available.update({k: v for k, v in batch.columns.items() if k != "prompt"})
        aliases: dict[str, Any] = {"questions": batch.prompts, "context": dict(batch.context)}
        reference = batch.reference()
        if reference is not None:
            aliases.update(dict.fromkeys(REFERENCE_ALIASES, reference))
        aliases.update({name: batch.columns[col] for name, col in COLUMN_ALIASES.items() if col in batch.columns})
        if self.compute_reward:  # the math-QA trainer's names: the texts of the prompts and of the completions
            aliases["questions"] = [text_of(p) for p in batch.prompts]
            if "completions" not in self._params():
                available.pop("answers", None)  # its `answers` are the model's, whatever a column is called
                aliases["answers"] = [text_of(c) for c in batch.completions]
        return self._bind_from(available, aliases)

    def bind_row(self, batch: RewardBatch, i: int) -> dict[str, Any]:
        available = {"prompt": batch.prompts[i], "completion_ids": batch.completion_ids[i], **batch.context}
        available.update({k: v[i] for k, v in batch.columns.items() if k != "prompt"})
        aliases: dict[str, Any] = dict.fromkeys(SAMPLE_COMPLETION_ALIASES, batch.completions[i])
        aliases["question"] = batch.prompts[i]
        aliases["context"] = dict(batch.context)
        reference = batch.reference()
        if reference is not None:
            aliases.update(dict.fromkeys(SAMPLE_REFERENCE_ALIASES, reference[i]))
        aliases.update({name: batch.columns[col][i] for name, col in COLUMN_ALIASES.items() if col in batch.columns})
        available["completion"] = batch.completions[i]
        return self._bind_from(available, aliases)

    def check_columns(self, column_names, context_keys=CONTEXT_KEYS) -> None:
        """Raise RewardError now if an argument of the function matches none of these dataset columns."""
        columns = {name: [None] for name in column_names}
        batch = RewardBatch(prompts=[None], completions=[None], completion_ids=[[]], columns=columns,
                            context=dict.fromkeys(context_keys))
        self.bind_row(batch, 0) if self.per_sample else self.bind(batch)

    # ---- calling (in whichever process runs the function) ---------------------------------------
    def invoke(self, batch: RewardBatch) -> Any:
        """One call over the batch; a per-sample function is called once per row (async ones concurrently)."""
        if self.per_sample:
            if self.is_async:
                return asyncio.run(self._gather(batch))
            return [self.fn(**self.bind_row(batch, i)) for i in range(len(batch))]
        result = self.fn(**self.bind(batch))
        return asyncio.run(result) if inspect.isawaitable(result) else result

    def invoke_row(self, batch: RewardBatch, i: int) -> Any:
        """Score row i alone: the value, not a list."""
        if self.per_sample:
            result = self.fn(**self.bind_row(batch, i))
            return asyncio.run(result) if inspect.isawaitable(result) else result
        return self.check(self.invoke(batch.select([i])), 1)[0]

    async def _gather(self, batch: RewardBatch) -> list:
        return list(await asyncio.gather(*(self.fn(**self.bind_row(batch, i)) for i in range(len(batch)))))

    def check(self, result: Any, expected: int) -> list[float]:
        """Plain floats (NaN = not applicable) or a RewardError naming the function."""
        if hasattr(result, "detach"):
            result = result.detach().cpu()
        if hasattr(result, "tolist") and not isinstance(result, (str, bytes)):
            result = result.tolist()
        if not isinstance(result, Sequence) or isinstance(result, (str, bytes)):
            raise RewardError(f"reward function '{self.name}' returned {type(result).__name__}; "
                              f"expected a list of {expected} floats (None for not applicable)")
        if len(result) != expected:
            raise RewardError(f"reward function '{self.name}' returned {len(result)} values for {expected} "
                              "completions; return one value per completion (None for not applicable)")
        return [self.check_value(v, i) for i, v in enumerate(result)]

    def check_value(self, value: Any, i: int) -> float:
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            value = value.item()
        if value is None:
            return math.nan
        if isinstance(value, numbers.Real):
            value = float(value)
            return math.nan if math.isnan(value) else value
        raise RewardError(f"reward function '{self.name}' returned {type(value).__name__} ({value!r:.60}) for "
                          f"completion {i}; expected a float or None")

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]],
                 columns: dict[str, list], context: dict[str, Any] | None = None) -> list[float]:
        """Call in this process, no timeout: for tests and tools; training goes through RewardRunner."""
        batch = RewardBatch(prompts=prompts, completions=completions, completion_ids=completion_ids, columns=columns,
                            context=context or {})
        try:
            result = self.invoke(batch)
        except RewardError:
            raise
        except Exception as exc:  # user code: name the function instead of a bare traceback
            raise RewardError(f"reward function '{self.name}' raised {type(exc).__name__}: {exc}") from exc
        return self.check(result, len(completions))
