"""Rewards: resolve what a config or a script names into RewardFunctions, and score with them.

`reward_funcs` entries are a built-in name (`math_accuracy`), a dotted path importable from the
working directory (`my_module.my_reward`), a file path (`rewards.py:my_reward`), a callable, or a
mapping `{func: <one of those>, name:, args: {...}, weight:, cache:, isolation:}`. A class is
constructed with `args` (its config parameters); a function given `args` gets them as fixed keyword
arguments. See contract.py for how they are called and runner.py for how they are run.

Importing this package loads no torch (the config imports registry.py through it): `RewardRunner`
is imported on first use, and `score` imports torch when called.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
from typing import TYPE_CHECKING, Any

from grpokit.errors import GrpokitError, RewardError
from grpokit.rewards.contract import RewardBatch, RewardFunction, per_sample
from grpokit.rewards.registry import BUILTIN_REWARDS, reward_name
from grpokit.userimport import import_user_object

if TYPE_CHECKING:
    import torch

    from grpokit.rewards.runner import RewardRunner

__all__ = ["RewardBatch", "RewardFunction", "RewardRunner", "per_sample", "resolve_reward", "resolve_rewards",
           "reward_name", "score"]


def __getattr__(name: str) -> Any:
    """`RewardRunner` on first use (PEP 562): runner.py imports torch, which a config check does not need."""
    if name == "RewardRunner":
        from grpokit.rewards.runner import RewardRunner

        return RewardRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _load(spec: str) -> Any:
    if spec in BUILTIN_REWARDS:
        module_name, _, attr = BUILTIN_REWARDS[spec].partition(":")
        return getattr(importlib.import_module(module_name), attr)
    if ":" in spec or "." in spec:
        return import_user_object(spec, key="reward_funcs", error=RewardError, namespace="grpokit_user_rewards")
    close = difflib.get_close_matches(spec, BUILTIN_REWARDS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise RewardError(f"reward_funcs: unknown reward '{spec}'{hint} Built-ins: {sorted(BUILTIN_REWARDS)}; "
                      "or give 'module.function' or 'file.py:function'")


def _instantiate(name: str, obj: Any, args: dict[str, Any]) -> Any:
    if inspect.isclass(obj):
        try:
            inspect.signature(obj).bind(**args)
        except TypeError as exc:
            params = [p for p in inspect.signature(obj).parameters if p not in ("self", "args", "kwargs")]
            raise RewardError(f"reward '{name}': bad args {sorted(args)} for {obj.__name__}: {exc}; "
                              f"its parameters: {params}") from None
        try:
            return obj(**args)
        except GrpokitError:
            raise
        except Exception as exc:  # a constructor refusing its settings is a config error, not a crash
            raise RewardError(f"reward '{name}': {obj.__name__}(**{args}) failed: "
                              f"{type(exc).__name__}: {exc}") from None
    if args:
        if not callable(obj):
            raise RewardError(f"reward '{name}': args given, but {type(obj).__name__} takes none")
        unknown = set(args) - set(inspect.signature(obj).parameters)
        if unknown and not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(obj).parameters.values()):
            raise RewardError(f"reward '{name}': args {sorted(unknown)} are not parameters of {obj.__name__}")
        fixed = functools.partial(obj, **args)
        functools.update_wrapper(fixed, obj)
        return fixed
    return obj


def resolve_reward(entry: Any) -> RewardFunction:
    """One `reward_funcs` entry -> a RewardFunction (built-in name, dotted path, file path, callable, or mapping)."""
    if hasattr(entry, "model_dump"):  # the config's RewardEntry
        entry = entry.model_dump(exclude_none=True)
    spec = dict(entry) if isinstance(entry, dict) else {"func": entry}
    target = spec.get("func")
    if target is None:
        raise RewardError(f"reward_funcs entry {entry!r} has no 'func'")
    name = reward_name(spec)
    obj = _load(target) if isinstance(target, str) else target
    obj = _instantiate(name, obj, spec.get("args") or {})
    return RewardFunction.wrap(name, obj, expensive=spec.get("cache"), isolation=spec.get("isolation"))


def resolve_rewards(entries: list[Any]) -> list[RewardFunction]:
    funcs = [resolve_reward(e) for e in entries]
    names = [f.name for f in funcs]
    slashed = [n for n in names if "/" in n or not n]
    if slashed:
        raise RewardError(f"reward_funcs: reward name(s) {slashed} are not allowed: give each a non-empty `name:` "
                          "without '/' (metrics are logged as rewards/{name}/mean)")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise RewardError(f"reward_funcs: more than one reward named {twice}; give each a distinct `name:` "
                          "(metrics are logged as rewards/{name}/mean)")
    return funcs


def score(funcs: list[RewardFunction], prompts: list, completions: list, completion_ids: list[list[int]],
          columns: dict[str, list], **context: Any) -> torch.Tensor:
    """[N, K] float64 rewards in this process, no timeouts: a convenience for tools and tests."""
    import torch

    matrix = [f(prompts, completions, completion_ids, columns, context) for f in funcs]
    return torch.tensor(matrix, dtype=torch.float64).T.reshape(len(completions), len(funcs))

