"""QLoRA (`load_in_4bit`): the config and its Axolotl/TRL spellings, the `BitsAndBytesConfig` that would be built, the
machine checks (no CUDA GPU, no bitsandbytes) and where they stop a run, and that nothing copies or merges into
4-bit weights. The machines these tests run on have no GPU, so 4-bit training itself is not exercised here."""

import json
import sys
import types

import pytest
import torch
import yaml

from grpokit.config import load_config, validate_config
from grpokit.errors import ConfigError
from grpokit.models import loading as models
from tests.conftest import build_tiny_model, run_cli


def test_config_accepts_load_in_4bit_with_lora():
    cfg = validate_config({"load_in_4bit": True, "use_peft": True})
    assert (cfg.load_in_4bit, cfg.use_peft, cfg.bnb_4bit_quant_type, cfg.bnb_4bit_use_double_quant) == (
        True, True, "nf4", True)


def test_config_rejects_load_in_4bit_without_lora():
    with pytest.raises(ConfigError) as err:
        validate_config({"load_in_4bit": True})
    assert "load_in_4bit: 4-bit weights cannot be trained directly" in str(err.value)
    assert "Set use_peft: true" in str(err.value)


@pytest.mark.parametrize(("extra", "fragment"), [
    ({"torch_dtype": "float64"}, "not float64; set torch_dtype: bfloat16"),
    ({"use_vllm": True}, "set use_vllm: false"),
    ({"device": "cpu"}, "need a CUDA device, but device is 'cpu'"),
    ({"bnb_4bit_quant_type": "int4"}, "bnb_4bit_quant_type: Input should be 'nf4' or 'fp4'"),
])
def test_config_rejects_what_4bit_cannot_do(extra, fragment):
    with pytest.raises(ConfigError) as err:
        validate_config({"load_in_4bit": True, "use_peft": True, **extra})
    assert fragment in str(err.value)


def test_axolotl_adapter_and_trl_spellings(tmp_path):
    (tmp_path / "axolotl.yaml").write_text(yaml.safe_dump(
        {"rl": "grpo", "base_model": "org/m", "adapter": "qlora", "bnb_config_kwargs": {"bnb_4bit_quant_type": "fp4"}}))
    cfg = load_config(tmp_path / "axolotl.yaml")
    assert (cfg.use_peft, cfg.load_in_4bit, cfg.bnb_4bit_quant_type) == (True, True, "fp4")
    lora = validate_config({"adapter": "lora"})
    assert (lora.use_peft, lora.load_in_4bit) == (True, False)
    assert validate_config({"adapter": None}).use_peft is False
    trl = validate_config({"load_in_4bit": True, "use_peft": True, "use_bnb_nested_quant": False})
    assert trl.bnb_4bit_use_double_quant is False
    # a later layer turns 4-bit off for one command (e.g. --set load_in_4bit=false for `grpokit sft`)
    assert load_config(tmp_path / "axolotl.yaml", ["load_in_4bit=false"]).load_in_4bit is False


@pytest.mark.parametrize(("data", "fragment"), [
    ({"adapter": "qlora", "load_in_4bit": False}, "adapter: qlora and load_in_4bit are both set"),
    ({"adapter": "qlora", "use_peft": False}, "adapter: qlora and use_peft are both set"),
    ({"adapter": "ia3"}, "adapter: 'ia3' is not supported"),
    ({"adapter": "qlora", "bnb_config_kwargs": {"llm_int8_threshold": 6.0}}, "bnb_config_kwargs: only"),
])
def test_axolotl_spellings_that_contradict_or_are_unknown(data, fragment):
    with pytest.raises(ConfigError, match=fragment):
        validate_config(data)


@pytest.mark.parametrize(("settings", "expected"), [
    ({"bf16": False}, {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                       "bnb_4bit_compute_dtype": torch.float32}),
    ({"bf16": True}, {"bnb_4bit_compute_dtype": torch.bfloat16}),
    ({"torch_dtype": "bfloat16"}, {"bnb_4bit_compute_dtype": torch.bfloat16}),
    ({"torch_dtype": "float16"}, {"bnb_4bit_compute_dtype": torch.float16}),
    ({"bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False, "bf16": False},
     {"bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": torch.float32}),
])
def test_bitsandbytes_config_follows_the_run(settings, expected):
    from transformers import BitsAndBytesConfig

    kwargs = models.bnb_4bit_kwargs(validate_config({"load_in_4bit": True, "use_peft": True, **settings}))
    assert kwargs["load_in_4bit"] is True and kwargs.items() >= expected.items()
    built = BitsAndBytesConfig(**kwargs)  # transformers accepts exactly these arguments
    assert built.load_in_4bit and not built.load_in_8bit
    for key, value in {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, **expected}.items():
        assert getattr(built, key) == value, key
    assert models.bnb_4bit_kwargs(validate_config({"use_peft": True})) is None


@pytest.mark.parametrize("native", [True, False])
def test_the_compute_dtype_under_bf16_auto_follows_the_gpu(monkeypatch, native):
    import grpokit.runtime as runtime

    monkeypatch.setattr(runtime, "bf16_unsupported", lambda device: None if native else "the GPU has no native bf16")
    cfg = validate_config({"load_in_4bit": True, "use_peft": True})
    assert cfg.bf16 == "auto"
    assert models.bnb_4bit_kwargs(cfg)["bnb_4bit_compute_dtype"] is (torch.bfloat16 if native else torch.float32)
    assert cfg.bf16 is native  # settled on the way


QLORA = {"load_in_4bit": True, "use_peft": True}


def test_no_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        models.check_quantization(validate_config(QLORA))
    message = str(err.value)
    assert "needs a CUDA GPU here" in message and "torch.cuda.is_available() is False" in message
    assert "Drop load_in_4bit and train LoRA on full-precision or bf16 weights" in message
    models.check_quantization(validate_config({"use_peft": True}))  # without 4-bit there is nothing to check


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(ConfigError, match=r"not installed; install it with: pip install 'grpokit\[qlora\]'"):
        models.check_quantization(validate_config(QLORA))
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(__version__="0.43.0"))
    with pytest.raises(ConfigError, match=r"bitsandbytes 0.43.0 is too old \(needs >= 0.46.1\)"):
        models.check_quantization(validate_config(QLORA))


def test_load_policy_quantises_onto_the_cuda_device_and_prepares_for_kbit_training(monkeypatch, tiny_model_dir):
    """The wiring, on a CPU: from_pretrained gets the BitsAndBytesConfig and a device map (recorded, then loaded
    unquantised), and peft's real prepare_model_for_kbit_training runs (base frozen, 16-bit weights to float32)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(__version__="0.50.2"))
    calls = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def recording(cls, path, **kwargs):
        calls.append(kwargs)
        return real(cls, path, dtype=kwargs["dtype"])

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(recording))
    quantization = models.bnb_4bit_kwargs(validate_config({**QLORA, "torch_dtype": "bfloat16"}))
    model = models.load_policy(str(tiny_model_dir), torch.bfloat16, quantization=quantization, device="cuda:1")
    (kwargs,) = calls
    assert isinstance(kwargs["quantization_config"], BitsAndBytesConfig) and kwargs["device_map"] == {"": 1}
    assert kwargs["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    models.load_policy(str(tiny_model_dir), quantization=quantization)  # device unset: the current CUDA device
    assert calls[-1]["device_map"] == {"": 0}
    models.load_policy(str(tiny_model_dir))  # no quantization: no 4-bit arguments at all (export --merge relies on it)
    assert "quantization_config" not in calls[-1] and "device_map" not in calls[-1]


def test_export_merge_reloads_the_base_unquantised(monkeypatch, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from grpokit.evaluation.inference import export_merged

    policy = models.add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 4, 8, 0.0, "all-linear")
    policy.save_pretrained(tmp_path / "adapter")
    calls = []
    real = AutoModelForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, path, **kw: calls.append(kw) or real(cls, path, **kw)))
    export_merged(tmp_path / "adapter", tmp_path / "merged", merge=True)
    assert calls and not any("quantization_config" in kw for kw in calls)
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())


def test_no_frozen_copy_of_a_4bit_model():
    model, _ = build_tiny_model()
    model.is_loaded_in_4bit = True  # what transformers sets on a bitsandbytes 4-bit model
    with pytest.raises(ConfigError, match="use_peft: true"):
        models.frozen_copy(model)


def _qlora_config(tmp_path, **overrides):
    """A QLoRA config whose data and model do not exist: an error about either means something loaded first."""
    config = {"model": "./no-model-here", "dataset": "no-data-here.jsonl", "output_dir": "run", "use_peft": True,
              "load_in_4bit": True, "report_to": "none", **overrides}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    return "cfg.yaml"


def test_config_without_lora_stops_train_before_anything_loads(tmp_path):
    result = run_cli("train", _qlora_config(tmp_path, use_peft=False), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "load_in_4bit: 4-bit weights cannot be trained directly" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_sft_refuses_4bit_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    result = run_cli("sft", _qlora_config(tmp_path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "load_in_4bit: `grpokit sft` does not train on 4-bit weights" in result.stderr
    assert "--set load_in_4bit=false" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra", [[], ["--dry-run"]], ids=["train", "dry-run"])
def test_no_cuda_stops_train_before_anything_loads(tmp_path, monkeypatch, extra):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no CUDA GPU, also on a machine that has one
    result = run_cli("train", _qlora_config(tmp_path), *extra, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "load_in_4bit: 4-bit (QLoRA) loading uses bitsandbytes, which needs a CUDA GPU here" in result.stderr
    assert "Drop load_in_4bit and train LoRA on full-precision or bf16 weights" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()
    assert "dry run" not in result.stdout
