"""The shipped presets: named starting configs in `grpokit/config/presets/NAME.yaml`.

A preset is the lowest layer of a config (`--preset NAME` or a `preset:` key); the file, `--set` and
the command line override its keys (see loading.py). The CLI keeps its own copy of the names
(`cli.PRESET_NAMES`) so that `grpokit --help` imports no config code.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from grpokit.config.files import read_file
from grpokit.errors import ConfigError

PRESETS_DIR = Path(__file__).parent / "presets"
PRESETS = ("default", "fast_test", "full_training", "low_memory", "from_sft")


def load_preset(name: str) -> dict[str, Any]:
    """The keys of a shipped preset; an unknown name is an error with a did-you-mean."""
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"preset: unknown preset '{name}'{hint} Presets: {', '.join(PRESETS)}")
    return read_file(PRESETS_DIR / f"{name}.yaml")
