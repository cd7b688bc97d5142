"""`model:` names: a local directory is checked before anything loads; a name that can only be a path and does not
exist is an error naming it, where transformers would read it as a hub id and fail with another message."""

from pathlib import Path

import pytest

from grpokit.errors import ConfigError
from grpokit.models.loading import DEFAULT_MODEL, check_model_name


@pytest.mark.parametrize("name", ["gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", DEFAULT_MODEL, "Qwen/Qwen2.5-0.5B"])
def test_hub_ids_and_the_embedded_model_pass_as_they_are(name):
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", ["output/sft/final_model", "./run/final_model", "/no/such/dir", "~/no-such-model",
                                  "runs\\final_model", "org/"])
def test_a_path_that_does_not_exist_is_named(name):
    with pytest.raises(ConfigError, match=f"model: directory '{name}' does not exist".replace("\\", "\\\\")):
        check_model_name(name)


def test_a_missing_directory_under_an_existing_one_is_a_path_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_model_name("outputs/final_model") == "outputs/final_model"  # no 'outputs' here: maybe a hub id
    (tmp_path / "outputs").mkdir()
    with pytest.raises(ConfigError, match="directory 'outputs/final_model' does not exist"):
        check_model_name("outputs/final_model")
    (tmp_path / "outputs" / "final_model").mkdir()
    with pytest.raises(ConfigError, match="is a path but holds no config.json"):
        check_model_name("outputs/final_model")
    (tmp_path / "outputs" / "final_model" / "config.json").write_text("{}")
    assert Path(check_model_name("outputs/final_model")) == Path("outputs/final_model")
