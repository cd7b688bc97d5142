"""Import an object a user names in a config: 'module.attr' (importable from the working directory) or
'file.py:attr'."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any


def import_user_object(spec: str, *, key: str, error: type[Exception], namespace: str) -> Any:
    """The attribute `spec` names; `error(f"{key}: ...")` says what is missing. Plain names are the caller's."""
    if ":" in spec:
        file, _, attr = spec.rpartition(":")
        path = Path(file)
        if not path.is_file():
            raise error(f"{key}: file '{file}' (from '{spec}') does not exist")
        module_spec = importlib.util.spec_from_file_location(f"{namespace}.{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # the user's module failed while loading: say where, not a traceback
            raise error(f"{key}: loading '{file}' (for '{spec}') failed: {_describe(exc)}") from None
    else:
        module_name, _, attr = spec.rpartition(".")
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # let users name modules in their working directory
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise error(f"{key}: cannot import module '{module_name}' for '{spec}': {exc}") from None
        except Exception as exc:  # the module exists but its own code failed while importing
            raise error(f"{key}: importing module '{module_name}' (for '{spec}') failed: {_describe(exc)}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise error(f"{key}: '{spec}': no function or class '{attr}' in {module.__name__}")
    return obj


def _describe(exc: Exception) -> str:
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({exc.filename}, line {exc.lineno})"
    return f"{type(exc).__name__}: {exc}"
