"""Presets, layer precedence, the math-QA trainer's options and other tools' config keys."""

import pytest

from grpokit.cli import _load, _parser, cli_config
from grpokit.config import PRESETS, PRESETS_DIR, GRPOConfig, load_config, validate_config
from grpokit.errors import ConfigError


def test_every_preset_file_is_shipped_and_loads():
    assert sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")) == sorted(PRESETS)
    for name in PRESETS:
        extra = ["sft_model=some/sft"] if name == "from_sft" else []
        assert isinstance(load_config(None, extra, preset=name), GRPOConfig), name


# reference 003's documented presets: (epochs, samples per question, questions per step, KL, learning rate); None:
# the reference gives no number (grpokit's choice, in the preset's comment)
# KL: 0.1 in each, the reference's default kl_coef ("Default: 0.1"), which it overrides for no preset
DOCUMENTED_PRESETS = {"default": (3, 4, 2, 0.1, None), "fast_test": (1, 2, 1, 0.1, None),
                      "full_training": (5, 8, 4, 0.1, None), "from_sft": (None, 4, None, 0.1, 5e-6),
                      "low_memory": (None, 2, 1, 0.1, None)}


@pytest.mark.parametrize("name", PRESETS)
def test_the_math_qa_presets_carry_the_documented_numbers_with_lora(name, caplog):
    with caplog.at_level("INFO", logger="grpokit"):
        cfg = load_config(None, preset=name, cli={"sft_model": "out/sft"} if name == "from_sft" else None)
    epochs, samples, questions, kl, lr = DOCUMENTED_PRESETS[name]
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps // cfg.num_generations
    got = (cfg.num_train_epochs, cfg.num_generations, per_step, cfg.beta, cfg.learning_rate)
    for documented, value in zip((epochs, samples, questions, kl, lr), got, strict=True):
        assert documented is None or value == documented, (name, got)
    assert cfg.use_peft is True
    assert cfg.reward_funcs == ["heuristic_math_qa"]  # "Heuristic Reward Model (Default)"
    assert (cfg.output_dir, cfg.save_steps) == ("output/grpo", 100)  # its layout: output/grpo/checkpoint-100/
    # 4-bit where a CUDA GPU and bitsandbytes are present; on this machine (no bitsandbytes or no GPU) off, said
    import importlib.util

    import torch

    here = importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available()
    assert cfg.load_in_4bit is here
    if not here:
        assert "load_in_4bit: auto -> off:" in caplog.text
    assert load_config(None, preset=name, cli={"load_in_4bit": False, "sft_model": "s"}).load_in_4bit is False


def test_unknown_preset_suggests_the_right_one():
    with pytest.raises(ConfigError, match="unknown preset 'fast_tst'; did you mean 'fast_test'"):
        load_config(None, preset="fast_tst")


def test_precedence_preset_file_set_cli(tmp_path):
    (tmp_path / "c.yaml").write_text("preset: fast_test\nmax_completion_length: 20\nlearning_rate: 3.0e-6\n")
    cfg = load_config(tmp_path / "c.yaml", ["learning_rate=4e-6", "beta=0.2"], cli={"beta": 0.3})
    assert cfg.num_generations == 2 and cfg.num_train_epochs == 1  # preset keys from the file
    assert cfg.max_completion_length == 20 and cfg.learning_rate == 4e-6 and cfg.beta == 0.3
    assert load_config(tmp_path / "c.yaml", preset="low_memory").use_peft is True  # --preset beats preset:


def test_epochs_and_steps_the_higher_layer_wins():
    assert load_config(None, ["max_steps=7"], preset="full_training").num_train_epochs is None
    cfg = load_config(None, [], preset="fast_test", cli={"num_train_epochs": 2})
    assert cfg.num_train_epochs == 2 and "max_steps" not in cfg.to_yaml()
    assert cfg.steps_for_epochs(5) == 2 * 5  # 1 prompt per generation -> 5 generations an epoch
    cfg = load_config(None, ["max_steps=2"], preset="fast_test")  # the cap fast_test's comment suggests
    assert cfg.max_steps == 2 and cfg.num_train_epochs is None
    with pytest.raises(ConfigError, match="give one"):
        validate_config({"max_steps": 3, "num_train_epochs": 1})


def test_from_sft_needs_a_model():
    with pytest.raises(ConfigError, match="--sft-model"):
        load_config(None, preset="from_sft")
    assert load_config(None, preset="from_sft", cli={"sft_model": "out/sft"}).model == "out/sft"


@pytest.mark.parametrize(("argv", "field", "value"), [
    (["--train-data", "t.jsonl"], "dataset", "t.jsonl"),
    (["--val-data", "v.jsonl"], "eval_dataset", "v.jsonl"),
    (["--model-name", "org/m"], "model", "org/m"),
    (["--sft-model", "out/sft"], "model", "out/sft"),
    (["--num-samples", "4"], "num_generations", 4),
    (["--kl-coef", "0.05"], "beta", 0.05),
    (["--epochs", "3"], "num_train_epochs", 3.0),
    (["--lr", "5e-6"], "learning_rate", 5e-6),
    (["--max-length", "64"], "max_completion_length", 64),
    (["--output-dir", "o"], "output_dir", "o"),
    (["--no-lora", "--preset", "low_memory"], "use_peft", False),
    (["--no-4bit", "--set", "load_in_4bit=true", "--set", "use_peft=true"], "load_in_4bit", False),
    (["--reward-model", "heuristic"], "reward_funcs", ["heuristic_math_qa"]),
    (["--batch-size", "2", "--num-samples", "4"], "per_device_train_batch_size", 8),
])
def test_math_qa_options_set_their_config_field(argv, field, value):
    cfg = _load(_parser().parse_args(["train", *argv]))
    assert getattr(cfg, field) == value


@pytest.mark.parametrize(("preset", "argv", "questions", "samples"), [
    ("default", ["--num-samples", "16"], 2, 16),  # the reference's 8-16 samples: its 2 questions a step kept
    ("default", ["--num-samples", "16", "--batch-size", "2"], 2, 16),
    ("default", ["--num-samples", "8"], 2, 8),  # was 8 completions: 1 question, dropped in silence
    ("fast_test", ["--num-samples", "4"], 1, 4),
    ("full_training", ["--num-samples", "4", "--batch-size", "3"], 3, 4),
    ("low_memory", ["--batch-size", "2"], 2, 2),
    ("default", ["--set", "num_generations=16"], 2, 16),
])
def test_math_qa_presets_count_their_batch_in_questions(preset, argv, questions, samples):
    """Reference 003 gives each preset's batch in questions and lets `--num-samples` change the samples per
    question: a preset's batch keeps its questions at any num_generations, and `--batch-size` counts questions."""
    cfg = _load(_parser().parse_args(["train", "--config", preset, *argv]))
    assert (cfg.per_device_train_batch_size, cfg.num_generations) == (questions * samples, samples)


def test_a_batch_set_above_the_preset_counts_completions_and_errors_name_their_layers():
    cfg = _load(_parser().parse_args(["train", "--config", "default", "--set", "per_device_train_batch_size=16"]))
    assert (cfg.per_device_train_batch_size, cfg.num_generations) == (16, 4)  # the user's own completions
    with pytest.raises(ConfigError, match=r"^preset 'default' \+ --set \+ command line: invalid config:\n.* = 6 "
                                          r"completions per generation is not divisible by num_generations = 4"):
        _load(_parser().parse_args(["train", "--config", "default", "--set", "per_device_train_batch_size=6",
                                    "--num-samples", "4"]))


def test_batch_size_in_questions_with_a_num_generations_from_a_file(tmp_path):
    """--batch-size counts questions against the num_generations the layers give: YAML's string "8" as validation
    reads it, and an invalid one reported under its own key, not as a failed multiplication."""
    (tmp_path / "c.yaml").write_text('num_generations: "8"\n')
    cfg = _load(_parser().parse_args(["train", str(tmp_path / "c.yaml"), "--batch-size", "2"]))
    assert (cfg.per_device_train_batch_size, cfg.num_generations) == (16, 8)
    (tmp_path / "c.yaml").write_text("num_generations: null\n")
    with pytest.raises(ConfigError, match="num_generations"):
        _load(_parser().parse_args(["train", str(tmp_path / "c.yaml"), "--batch-size", "2"]))


def test_sft_under_a_preset_keeps_its_own_learning_rate_and_lengths_and_writes_beside_grpo():
    """`grpokit sft --config PRESET` (reference 003's `train_sft.py --config default`) learns at SFT's rate (the
    reference's 2e-4 with LoRA), not the preset's GRPO rate, keeps SFT's lengths, and writes output/sft, the path
    the reference's GRPO command reads (`--sft-model output/sft/final_model`); GRPO under it writes output/grpo."""
    from grpokit.train.sft import sft_defaults

    for preset in ("default", "fast_test", "full_training", "low_memory"):
        grpo = _load(_parser().parse_args(["train", "--config", preset]))
        sft = sft_defaults(_load(_parser().parse_args(["sft", "--config", preset])))
        assert (grpo.output_dir, sft.output_dir) == ("output/grpo", "output/sft")
        assert grpo.learning_rate == 1e-5 and sft.learning_rate == 2e-4 and sft.use_peft
        assert sft.max_completion_length == GRPOConfig.model_fields["max_completion_length"].default
    mine = sft_defaults(_load(_parser().parse_args(["sft", "--config", "fast_test", "--lr", "1e-4", "--output-dir",
                                                    "o"])))
    assert (mine.learning_rate, mine.output_dir) == (1e-4, "o")


def test_config_flag_takes_a_preset_name_or_a_file(tmp_path):
    """Reference 003 spells the preset `--config fast_test`; a file path there works as the positional CONFIG."""
    assert _load(_parser().parse_args(["train", "--config", "fast_test"])).num_generations == 2
    assert _load(_parser().parse_args(["train", "--config", "low_memory", "--no-lora"])).use_peft is False
    (tmp_path / "c.yaml").write_text("beta: 0.25\n")
    assert _load(_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml")])).beta == 0.25
    with pytest.raises(ConfigError, match="did you mean 'fast_test'"):
        _load(_parser().parse_args(["train", "--config", "fast-test"]))
    with pytest.raises(ConfigError, match="two config files"):
        _load(_parser().parse_args(["train", str(tmp_path / "c.yaml"), "--config", str(tmp_path / "c.yaml")]))
    with pytest.raises(ConfigError, match="both name a preset"):
        _load(_parser().parse_args(["train", "--config", "fast_test", "--preset", "default"]))


def test_learned_reward_model_needs_a_path():
    with pytest.raises(ConfigError, match="--reward-model-path"):
        cli_config(_parser().parse_args(["train", "--reward-model", "learned"]))
    cfg = _load(_parser().parse_args(["train", "--reward-model", "learned", "--reward-model-path", "rm"]))
    assert cfg.reward_funcs[0].func == "reward_model" and cfg.reward_funcs[0].args == {"model": "rm"}


def test_axolotl_keys():
    cfg = validate_config({"rl": "grpo", "base_model": "org/m",
                           "datasets": [{"path": "d.jsonl", "type": "my_module.transform_fn", "split": "train"}],
                           "trl": {"beta": 0.001, "num_generations": 4, "max_completion_length": 100},
                           "micro_batch_size": 4, "sequence_len": 400,
                           "vllm": {"host": "h", "port": 9, "tensor_parallel_size": 2, "gpu_memory_utilization": 0.5,
                                    "max_model_len": 400, "dtype": "bfloat16", "enable_prefix_caching": False}})
    assert (cfg.model, cfg.dataset, cfg.beta, cfg.num_generations) == ("org/m", "d.jsonl", 0.001, 4)
    assert cfg.transform == "my_module.transform_fn"  # Axolotl's `type: module.fn` is the per-row transform
    assert cfg.vllm_dtype == "bfloat16" and cfg.vllm_enable_prefix_caching is False
    assert cfg.per_device_train_batch_size == 4 and cfg.max_prompt_length == 300
    assert (cfg.vllm_host, cfg.vllm_port, cfg.vllm_tensor_parallel_size) == ("h", 9, 2)
    assert cfg.vllm_gpu_memory_utilization == 0.5 and cfg.vllm_max_model_len == 400 and cfg.use_vllm is False


@pytest.mark.parametrize(("data", "fragment"), [
    ({"rl": "dpo"}, "rl: 'dpo' is not supported"),
    ({"vllm": {"hots": "x"}}, "vllm.hots: unknown key; did you mean 'host'?"),
    ({"micro_batch_size": 4, "per_device_train_batch_size": 8}, "give one"),
    ({"trl": {"use_vllm": True, "vllm_mode": "cluster"}}, "vllm_mode"),
    ({"load_in_4bit": True}, "load_in_4bit: 4-bit weights cannot be trained directly"),  # QLoRA needs use_peft
    ({"sequence_len": 100}, "sequence_len"),
    ({"reward_specs": [{"weight": 1.0}]}, "needs spec_class"),
    ({"datasets": [{"path": "d.jsonl", "type": "alpaca"}]}, "datasets[0].type: 'alpaca' is not supported"),
    ({"datasets": [{"path": "d.jsonl", "name": "main"}]}, "datasets[0].name: not supported by grpokit"),
    ({"datasets": [{"path": "d.jsonl", "split": "test"}]}, "datasets[0].split: 'test'"),
    ({"datasets": [{"path": "d.jsonl", "type": "m.f"}], "transform": "other.g"}, "give one"),
])
def test_bad_compat_keys_are_clear_errors(data, fragment):
    with pytest.raises(ConfigError) as err:
        validate_config(data)
    assert fragment in str(err.value)


def test_training_wizard_keys():
    cfg = validate_config({"recipe_class": "x.GRPORecipe", "sample_rate": 100, "load_in_4bit": False,
                           "reward_specs": [{"spec_class": "gec_f1", "weight": 2.0, "beta": 0.5},
                                            {"class": "answer_format"}]})
    assert cfg.log_completions_steps == 100 and cfg.reward_names == ["gec_f1", "answer_format"]
    assert cfg.reward_funcs[0].args == {"beta": 0.5} and cfg.weights == [2.0, 1.0]
