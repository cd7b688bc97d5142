"""The run configuration: the typed schema, loading from YAML/TOML, other tools' keys, presets."""
