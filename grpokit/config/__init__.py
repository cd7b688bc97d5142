"""The run configuration: the typed schema, loading from YAML/TOML, other tools' keys, presets.

- schema.py: `GRPOConfig` (fields, validators, derived properties), `RewardEntry`, and which fields may
  differ on resume (`resume_neutral_keys`);
- loading.py: `load_config` (preset < file < `--set` < CLI), `validate_config`, `describe_fields`;
- compat.py: `translate_keys`, other tools' keys (Axolotl, TRL, training-wizard) -> grpokit's;
- presets.py: the shipped presets (`PRESETS`, `PRESETS_DIR`, `load_preset`);
- files.py: reading one YAML or TOML file.

Importing it loads neither torch nor transformers: reading or checking a config needs neither.
"""

from grpokit.config.compat import translate_keys
from grpokit.config.loading import describe_fields, load_config, validate_config
from grpokit.config.presets import PRESETS, PRESETS_DIR, load_preset
from grpokit.config.schema import RESUME_NEUTRAL, GRPOConfig, RewardEntry, resume_neutral_keys

__all__ = ["PRESETS", "PRESETS_DIR", "RESUME_NEUTRAL", "GRPOConfig", "RewardEntry", "describe_fields", "load_config",
           "load_preset", "resume_neutral_keys", "translate_keys", "validate_config"]
