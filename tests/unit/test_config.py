import contextlib
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
import yaml

from grpokit.config import GRPOConfig, load_config, validate_config
from grpokit.config.schema import REPORT_SINKS
from grpokit.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError) as err:
        validate_config({"learning_rat": 1e-6, "num_generation": 4, "zzz": 1})
    text = str(err.value)
    assert "learning_rat: unknown key; did you mean 'learning_rate'?" in text
    assert "num_generation: unknown key; did you mean 'num_generations'?" in text
    assert "zzz: unknown key" in text


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"num_generations": 3, "per_device_train_batch_size": 8}, "num_generations can be [2, 4, 8]"),
    ({"num_generations": 1}, "num_generations"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"loss_type": "ppo"}, "loss_type"),
    ({"reward_weights": [1.0]}, "one weight per function"),
])
def test_impossible_values_are_rejected_at_load(overrides, fragment):
    with pytest.raises(ConfigError, match="invalid config") as err:
        validate_config(overrides)
    assert fragment in str(err.value)


def test_a_value_that_fits_no_member_of_a_union_gets_one_line():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["learning_rate=fast", "bf16=maybe", "load_in_4bit=3"])
    lines = str(err.value).splitlines()[1:]  # in the schema's order, each union's line where its errors began
    assert lines == ["  load_in_4bit: should be a valid boolean or 'auto' (got 3)",
                     "  learning_rate: Input should be a valid number, unable to parse string as a number (got 'fast')",
                     "  bf16: should be a valid boolean or 'auto' (got 'maybe')"]


def test_a_value_of_one_union_members_shape_gets_that_members_errors_without_its_tag():
    with pytest.raises(ConfigError) as err:
        validate_config({"report_to": ["wandb", "neptune"]})
    lines = str(err.value).splitlines()[1:]
    assert lines == ["  report_to.1: Input should be 'tensorboard', 'wandb', 'mlflow' or 'trackio' (got 'neptune')"]


@pytest.mark.parametrize(("value", "hint"), [("tensorbord", "did you mean 'tensorboard'? "), ("neptune", "")])
def test_one_unknown_sink_is_reported_under_its_key(value, hint):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"report_to={value}"])
    assert str(err.value).splitlines()[1:] == [
        f"  report_to: unknown sink; {hint}Give one of tensorboard, wandb, mlflow, trackio, a list of them, or auto, "
        f"all, none (got '{value}')"]


def test_report_to_takes_every_sink_it_lists_alone_or_in_a_list():
    member = typing.get_args(GRPOConfig.model_fields["report_to"].annotation)[0]  # list[Literal[...]]
    assert typing.get_args(typing.get_args(member)[0]) == REPORT_SINKS
    for sink in REPORT_SINKS:
        assert validate_config({"report_to": sink}).report_to == [sink]
        assert validate_config({"report_to": [sink]}).report_to == [sink]


def test_set_values_are_parsed_as_yaml(tmp_path):
    cfg = load_config(None, ["learning_rate=3e-6", "bf16=true", "reward_funcs=[number_correct]", "eval_limit=5",
                             "epsilon_high=0.28"])
    assert cfg.learning_rate == 3e-6 and cfg.bf16 is True and cfg.reward_funcs == ["number_correct"]
    assert cfg.eval_limit == 5 and cfg.epsilon_high == 0.28


def test_set_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["learning_rate"])


def test_yaml_and_toml_load_the_same_config(tmp_path):
    (tmp_path / "a.yaml").write_text("max_steps: 7\nreward_funcs: [answer_format]\nbeta: 0.1\n")
    (tmp_path / "a.toml").write_text('max_steps = 7\nreward_funcs = ["answer_format"]\nbeta = 0.1\n')
    assert load_config(tmp_path / "a.yaml") == load_config(tmp_path / "a.toml")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("max_steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_every_shipped_example_config_loads():
    accelerate = REPO / "examples" / "distributed"  # accelerate's launch configs (test_cli_commands.py loads them)
    configs = sorted(p for p in (REPO / "examples").rglob("*")
                     if p.suffix in (".yaml", ".yml", ".toml") and accelerate not in p.parents)
    assert configs, "no example configs found"
    for path in configs:
        assert isinstance(load_config(path), GRPOConfig), path


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["max_steps=3", "beta=0.04"])
    (tmp_path / "resolved.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_reward_entries_names_weights_and_combination():
    cfg = validate_config({"reward_funcs": ["math_accuracy", {"func": "code_tests", "name": "tests", "weight": 0.5,
                                                              "args": {"timeout_s": 5}}, "my_mod.fmt"],
                           "reward_combination": "gated", "reward_gate": "fmt", "eval_accuracy_reward": "tests"})
    assert cfg.reward_names == ["math_accuracy", "tests", "fmt"] and cfg.weights == [1.0, 0.5, 1.0]
    assert validate_config({"multi_objective_aggregation": "sum_then_normalize"}).reward_combination == "weighted_sum"
    assert (validate_config({"multi_objective_aggregation": "normalize_then_sum"}).reward_combination
            == "normalize_then_sum")


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"reward_funcs": ["math_acuracy"]},
     "reward_funcs[0]: unknown reward 'math_acuracy'; did you mean 'math_accuracy'?"),
    ({"reward_funcs": [{"fun": "length"}]}, "reward_funcs.0"),
    ({"reward_combination": "gated"}, "needs reward_gate: one of the rewards ['number_correct', 'answer_format']"),
    ({"reward_gate": "answer_format"}, "set reward_combination: gated"),
    ({"reward_funcs": [{"func": "length", "weight": 2.0}], "reward_weights": [1.0]}, "use one place"),
    ({"reward_timeout": 0}, "reward_timeout"),
    ({"reward_error_rate_limit": 1.5}, "reward_error_rate_limit"),
    ({"eval_accuracy_reward": "nope"}, "not one of the rewards"),
])
def test_bad_reward_settings_are_rejected_at_load(overrides, fragment):
    with pytest.raises(ConfigError, match="invalid config") as err:
        validate_config(overrides)
    assert fragment in str(err.value)


def test_a_setting_newer_than_a_checkpoint_counts_as_its_default_on_resume(tmp_path):
    from grpokit.train.checkpoint import check_config

    current = GRPOConfig().model_dump(mode="json")
    saved = {k: v for k, v in current.items() if k != "share_prompt_forward"}  # written before the setting existed
    check_config(saved, current, tmp_path)  # at its default: the same run
    with pytest.raises(ConfigError, match="share_prompt_forward: True -> False"):
        check_config(saved, {**current, "share_prompt_forward": False}, tmp_path)


# the settings that change what a run logs or keeps, not what it computes (marked RESUME_NEUTRAL in the schema)
RESUME_NEUTRAL_SETTINGS = {
    "output_dir", "logging_steps", "save_steps", "save_total_limit", "log_completions_steps", "report_to",
    "eval_steps", "eval_on_start", "eval_limit", "eval_max_completion_length", "eval_dataset", "validation_dataset",
    "eval_accuracy_reward",
    "eval_num_samples", "eval_pass_k", "metric_for_best_model", "greater_is_better", "sft_target_column",
    "reward_timeout", "reward_error_rate_limit", "max_consecutive_skips", "device", "vllm_host", "vllm_port",
    "vllm_gpu_memory_utilization", "vllm_enable_sleep_mode", "vllm_enable_prefix_caching",
    "max_train_seconds", "on_collapse",  # where a run ends, not what a step computes: a budget may grow on resume
}


@pytest.mark.parametrize("key", sorted(GRPOConfig.model_fields))
def test_only_the_neutral_settings_may_differ_on_resume(tmp_path, key):
    from grpokit.train.checkpoint import check_config

    saved = GRPOConfig(lr_scheduler_type="linear").model_dump(mode="json")  # linear: max_steps changes the schedule
    current = {**saved, key: "<changed>"}
    if key in RESUME_NEUTRAL_SETTINGS:
        check_config(saved, current, tmp_path)
    else:
        with pytest.raises(ConfigError, match=f"settings that change the results: {key}: "):
            check_config(saved, current, tmp_path)


def test_max_steps_may_grow_on_resume_under_a_constant_schedule(tmp_path):
    from grpokit.train.checkpoint import check_config

    saved = GRPOConfig().model_dump(mode="json")
    check_config(saved, {**saved, "max_steps": saved["max_steps"] * 2}, tmp_path)
    with pytest.raises(ConfigError, match="lr_scheduler_type: 'constant' -> 'cosine'"):
        check_config(saved, {**saved, "max_steps": saved["max_steps"] * 2, "lr_scheduler_type": "cosine"}, tmp_path)


def test_help_config_lists_every_key_with_its_default_and_help():
    from grpokit.config import describe_fields

    rows = describe_fields().splitlines()
    assert [row.partition(" (default ")[0] for row in rows] == list(GRPOConfig.model_fields)
    assert "output_dir (default 'outputs/grpo'): Run directory: config.yaml, metrics.jsonl, final_model/." in rows
    assert ("reward_funcs (default ['number_correct', 'answer_format']): Reward functions: built-in names, dotted "
            "paths ('pkg.module.fn'), 'file.py:fn', or {func:, name:, args:, weight:} entries.") in rows
    help_text = subprocess.run([sys.executable, "-m", "grpokit", "check", "--help-config"], capture_output=True,
                               text=True, cwd=REPO, check=True).stdout
    assert help_text.splitlines() == rows


@pytest.mark.parametrize("flags, native", [
    ("fpu sse2 avx2 avx512f avx512_bf16", True),  # Cooper Lake, AMD Zen 4
    ("fpu sse2 avx2 avx512f amx_bf16 amx_tile", True),  # Sapphire Rapids (flags as an AMX-only listing would give)
    ("fpu sse2 avx2 avx512f avx512bw", False),  # Skylake: bf16 only emulated
    ("", False),  # no /proc/cpuinfo
])
def test_bf16_auto_follows_the_cpus_native_bf16(monkeypatch, caplog, flags, native):
    import logging

    import grpokit.runtime as runtime

    monkeypatch.setattr(runtime, "cpu_info", lambda field: flags if field == "flags" else "")
    with caplog.at_level(logging.INFO, logger="grpokit.config"):
        cfg = GRPOConfig(device="cpu")
        assert cfg.bf16 == "auto" and not caplog.text  # loading a config needs no torch: the run settles it
        assert cfg.settle_auto() is cfg
    assert cfg.bf16 is native and set(cfg.settled_from_auto) == {"bf16"}
    rebuilt = GRPOConfig(**cfg.model_dump(exclude_unset=True))  # as `grpokit plan` rebuilds it: no second settling
    assert rebuilt.bf16 is native
    assert yaml.safe_load(cfg.to_yaml())["bf16"] is native  # the run's config.yaml records the choice
    assert ("bf16: auto -> on" if native else "bf16: auto -> off: the CPU has no avx512_bf16 or AMX") in caplog.text


def test_bf16_auto_is_off_for_half_weights_and_gpus_without_native_bf16(monkeypatch, caplog):
    import logging

    import grpokit.runtime as runtime

    monkeypatch.setattr(runtime, "cpu_info", lambda field: "avx512_bf16" if field == "flags" else "")
    with caplog.at_level(logging.INFO, logger="grpokit.config"):
        assert GRPOConfig(device="cpu", torch_dtype="bfloat16").settle_auto().bf16 is False
        assert "bf16: auto -> off: torch_dtype is bfloat16, not float32" in caplog.text
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert GRPOConfig(device="cuda").settle_auto().bf16 is False
        assert "off: no CUDA GPU is available" in caplog.text
        assert GRPOConfig().settle_auto().bf16 is True  # no device: the CPU when torch sees no GPU
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        gpus = {0: ("Tesla T4", False), 1: ("A100", True), 3: ("L4", True)}  # name, native bf16
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
        current = []
        monkeypatch.setattr(torch.cuda, "device", lambda i: current.append(i) or contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: gpus[i][0])
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: including_emulation or gpus[current[-1]][1])
        monkeypatch.delenv("LOCAL_RANK", raising=False)
        assert GRPOConfig().settle_auto().bf16 is False  # no device: the GPU when torch sees one, GPU 0
        assert "off: the GPU (Tesla T4) has no native bf16" in caplog.text
        assert GRPOConfig(device="cuda:1").settle_auto().bf16 is True  # the GPU the device names
        monkeypatch.setenv("LOCAL_RANK", "3")
        assert GRPOConfig(device="cuda").settle_auto().bf16 is False and current[-1] == 0  # a stray one: GPU 0
        monkeypatch.setenv("WORLD_SIZE", "4")  # a torchrun / accelerate process: its own GPU
        assert GRPOConfig(device="cuda").settle_auto().bf16 is True and current[-1] == 3


def test_a_run_computes_on_the_named_device_else_cuda_where_torch_sees_a_gpu(monkeypatch):
    """One rule (runtime.run_device) for the config's bf16: auto, the plan's CPU terms and the trainer's device."""
    from grpokit.evaluation import plan
    from grpokit.runtime import run_device

    for gpu in (True, False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        assert run_device(None) == ("cuda" if gpu else "cpu")
        assert run_device("cpu") == "cpu" and run_device("cuda:1") == "cuda:1"
        assert GRPOConfig()._on_cuda() is gpu and plan.trains_on_cpu(GRPOConfig()) is not gpu
        assert GRPOConfig(device="cuda:1")._on_cuda() and not plan.trains_on_cpu(GRPOConfig(device="cuda:1"))
        assert not GRPOConfig(device="cpu")._on_cuda() and plan.trains_on_cpu(GRPOConfig(device="cpu"))


@pytest.mark.parametrize("value", [True, False])
def test_an_explicit_bf16_is_kept_and_not_settled(value):
    cfg = GRPOConfig(bf16=value).settle_auto()
    assert cfg.bf16 is value and cfg.settled_from_auto == {}
    assert load_config(None, [f"bf16={str(value).lower()}"]).settle_auto().bf16 is value
    assert set(load_config(None, ["bf16=auto"]).settle_auto().settled_from_auto) == {"bf16"}


def test_bf16_auto_names_a_gpu_this_process_cannot_see(monkeypatch):
    from grpokit.runtime import bf16_unsupported

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    with pytest.raises(ConfigError, match=r"device cuda:2 names CUDA GPU 2, but this process sees 1 "
                                          r"\(CUDA_VISIBLE_DEVICES=5\); name a visible GPU \(cuda:0 to cuda:0\)"):
        bf16_unsupported("cuda:2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="LOCAL_RANK 1 names CUDA GPU 1, but this process sees 1"):
        bf16_unsupported("cuda")
    with pytest.raises(ConfigError, match="device cuda:x names CUDA GPU x"):
        bf16_unsupported("cuda:x")


def test_bf16_auto_on_a_gpu_can_wait_and_a_checkpoint_settles_it_unasked(monkeypatch):
    """settle_auto(cuda=False) leaves a GPU run's bf16 for later (the trainer asks the GPU after its reward workers
    fork); a resumed run's checkpoint settles it without asking the GPU at all; a value set by hand after settling
    is no longer auto's (no note, and a resume keeps it)."""
    from grpokit import runtime

    asked = []
    monkeypatch.setattr(runtime, "bf16_unsupported", lambda device: asked.append(device))  # None: native bf16
    gpu = GRPOConfig(device="cuda").settle_auto(cuda=False)
    assert gpu.bf16 == "auto" and gpu.settled_from_auto == {} and asked == []
    assert GRPOConfig(device="cpu").settle_auto(cuda=False).bf16 is True and asked == ["cpu"]
    said = gpu.keep_settled({"bf16": False}, "run/checkpoint-4")
    assert said == ["bf16: auto -> off, as the run in run/checkpoint-4 settled it"] and asked == ["cpu"]
    assert gpu.bf16 is False and gpu.model_dump(exclude_unset=True)["bf16"] is False
    assert gpu.settled_from_auto == {"bf16": said[0]}

    cfg = GRPOConfig(device="cpu").settle_auto()
    assert set(cfg.settled_from_auto) == {"bf16"}
    cfg.bf16 = False  # by hand: no longer auto's
    assert cfg.settled_from_auto == {} and cfg.keep_settled({"bf16": True}, "ckpt") == [] and cfg.bf16 is False
    unsettled = GRPOConfig(device="cuda")
    assert unsettled.take_settled(GRPOConfig(device="cpu").settle_auto()).bf16 is True
    assert set(unsettled.settled_from_auto) == {"bf16"}
