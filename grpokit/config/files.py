"""Reading one config file (YAML or TOML) into a mapping of keys to values, with errors that name the file.

Shared by the config loader (loading.py) and the presets (presets.py); it knows no keys.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from grpokit.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


def read_file(path: Path) -> dict[str, Any]:
    """The top-level mapping of a .yaml, .yml or .toml file (an empty file: {})."""
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
