"""The reward contract: resolve functions by name, call them, check what they return.

TRL's contract is the base: `f(prompts, completions, **kwargs) -> list[float | None]` with every
dataset column and `completion_ids` in kwargs. Functions without `**kwargs` get just the
arguments they name; `answer`, `answers`, `labels`, `references`, `ground_truth` and `solution`
also bind to the dataset's reference column under another name. None and NaN mean "not
applicable" and come back as NaN, never as 0. A wrong length or type, or an exception, is a
`RewardError` naming the function.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpokit.errors import RewardError
from grpokit.rewards.builtin import BUILTIN_REWARDS

REFERENCE_ALIASES = ("answer", "answers", "labels", "label", "references", "reference", "ground_truth", "solution")


@dataclass(slots=True, kw_only=True)
class RewardFunction:
    name: str
    fn: Callable[..., Any]

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]],
                 columns: dict[str, list]) -> list[float]:
        kwargs = self._bind(prompts, completions, completion_ids, columns)
        try:
            result = self.fn(**kwargs)
        except Exception as exc:  # user code: name the function instead of a bare traceback
            raise RewardError(f"reward function '{self.name}' raised {type(exc).__name__}: {exc}") from exc
        return self._check(result, len(completions))

    def check_columns(self, column_names) -> None:
        """Raise RewardError now if an argument of the function matches none of these dataset columns."""
        self._bind([], [], [], {name: [] for name in column_names})

    def _bind(self, prompts, completions, completion_ids, columns) -> dict[str, Any]:
        available: dict[str, Any] = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids}
        available.update({k: v for k, v in columns.items() if k != "prompt"})
        reference = next((columns[k] for k in REFERENCE_ALIASES if k in columns), None)
        params = inspect.signature(self.fn).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            bound = dict(available)
            for name in params:
                if name in REFERENCE_ALIASES and name not in bound and reference is not None:
                    bound[name] = reference
            return bound
        bound = {}
        for name, p in params.items():
            if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY):
                raise RewardError(f"reward function '{self.name}': positional-only or *args parameter '{name}' "
                                  "cannot be bound by name; use named parameters such as (prompts, completions, **kwargs)")
            if name in available:
                bound[name] = available[name]
            elif name in REFERENCE_ALIASES and reference is not None:
                bound[name] = reference
            elif p.default is inspect.Parameter.empty:
                raise RewardError(f"reward function '{self.name}' needs argument '{name}', which matches no dataset "
                                  f"column; columns: {sorted(available)}")
        return bound

    def _check(self, result: Any, expected: int) -> list[float]:
        if isinstance(result, torch.Tensor):
            result = result.detach().cpu().flatten().tolist()
        elif hasattr(result, "tolist") and not isinstance(result, (str, bytes)):
            result = result.tolist()
        if not isinstance(result, Sequence) or isinstance(result, (str, bytes)):
            raise RewardError(f"reward function '{self.name}' returned {type(result).__name__}; "
                              f"expected a list of {expected} floats (None for not applicable)")
        if len(result) != expected:
            raise RewardError(f"reward function '{self.name}' returned {len(result)} values for {expected} completions; "
                              "return one value per completion (None for not applicable)")
        values = []
        for i, v in enumerate(result):
            if v is None:
                values.append(math.nan)
            elif isinstance(v, numbers.Real):
                values.append(float(v))
            else:
                raise RewardError(f"reward function '{self.name}' returned {type(v).__name__} ({v!r:.60}) for "
                                  f"completion {i}; expected a float or None")
        return values


def resolve_reward(spec: str) -> RewardFunction:
    """A built-in name, a dotted path `package.module.function`, or `path/to/file.py:function`."""
    if spec in BUILTIN_REWARDS:
        return RewardFunction(name=spec, fn=BUILTIN_REWARDS[spec])
    if ":" in spec:
        file, _, attr = spec.rpartition(":")
        path = Path(file)
        if not path.is_file():
            raise RewardError(f"reward_funcs: file '{file}' (from '{spec}') does not exist")
        module_spec = importlib.util.spec_from_file_location(f"grpokit_user_rewards.{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    elif "." in spec:
        module_name, _, attr = spec.rpartition(".")
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # let users name modules in their working directory
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise RewardError(f"reward_funcs: cannot import module '{module_name}' for '{spec}': {exc}") from None
    else:
        close = difflib.get_close_matches(spec, BUILTIN_REWARDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise RewardError(f"reward_funcs: unknown reward '{spec}'{hint} Built-ins: {sorted(BUILTIN_REWARDS)}; "
                          "or give 'module.function' or 'file.py:function'")
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward_funcs: '{spec}': no function '{attr}' in {module.__name__}")
    return RewardFunction(name=attr, fn=fn)


def score(funcs: list[RewardFunction], prompts: list, completions: list, completion_ids: list[list[int]],
          columns: dict[str, list]) -> torch.Tensor:
    """[N, K] float64 rewards, NaN where a function said "not applicable"."""
    matrix = [f(prompts, completions, completion_ids, columns) for f in funcs]
    return torch.tensor(matrix, dtype=torch.float64).T.reshape(len(completions), len(funcs))
