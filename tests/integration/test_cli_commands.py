"""Every command's --help, eval/generate/export on the tiny model, and every
shipped example and preset: loaded, and each example config run for one step on the tiny model."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grpokit.config import PRESETS_DIR, GRPOConfig, load_config
from tests.conftest import run_cli, write_jsonl

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ["train", "check", "eval", "generate", "export", "sft", "filter", "plan", "report", "vllm-serve"]
ACCELERATE = REPO / "examples" / "distributed"  # accelerate's configs, not grpokit's
CONFIGS = sorted(p for p in (REPO / "examples").rglob("*")
                 if p.suffix in (".yaml", ".yml", ".toml") and ACCELERATE not in p.parents)
PIPELINE = REPO / "examples" / "pipeline"  # stages that read the previous stage's output: run in order below
TINY = ["--set", "max_steps=1", "--set", "num_generations=2", "--set", "per_device_train_batch_size=2",
        "--set", "max_completion_length=4", "--set", "eval_limit=2", "--set", "eval_steps=null",
        "--set", "device=cpu", "--set", "output_dir=run"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(tmp_path, command):
    result = run_cli(command, "--help", cwd=tmp_path)
    assert result.returncode == 0 and "usage: grpokit " + command in result.stdout


def test_vllm_serve_without_vllm_names_the_extra(tmp_path):
    assert "--model" in run_cli("vllm-serve", cwd=tmp_path).stderr  # required
    result = run_cli("vllm-serve", "--model", "some/model", cwd=tmp_path)
    assert result.returncode == 2 and "pip install 'grpokit[vllm]'" in result.stderr, result.stderr


def test_every_example_and_preset_loads():
    assert len(CONFIGS) >= 4
    for path in CONFIGS + sorted(PRESETS_DIR.glob("*.yaml")):
        extra = ["sft_model=x"] if path.stem == "from_sft" else []
        assert isinstance(load_config(path, extra), GRPOConfig), path


def test_accelerate_example_configs_load_in_accelerate():
    from accelerate.commands.config.config_args import ClusterConfig

    configs = sorted(ACCELERATE.glob("*.yaml"))
    assert configs
    for path in configs:
        assert ClusterConfig.from_yaml_file(path).num_processes > 1, path


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.parent != PIPELINE], ids=lambda p: p.name)
def test_every_example_runs_one_step(tmp_path, tiny_model_dir, config):
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    rel = config.relative_to(REPO)
    extra = ["--set", "sequence_len=200"] if "sequence_len" in config.read_text() else []
    result = run_cli("train", str(rel), "--set", f"model={tiny_model_dir}", "--set", "bf16=false",
                     "--set", "gradient_checkpointing=false", *TINY, *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert (tmp_path / "run" / "final_model").is_dir()


def test_math_qa_script_dry_run(tmp_path):
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    script = (REPO / "examples" / "math_qa_cli.sh").read_text()
    argv = script.split("exec grpokit ", 1)[1].replace("\\\n", " ").replace('"$@"', "").split()
    result = run_cli(*argv, "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "heuristic_math_qa" in result.stdout and "max_steps: 6" in result.stdout


@pytest.fixture
def qa_setup(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(3) for b in range(2)]
    write_jsonl(tmp_path / "qa.jsonl", rows)
    return ["--set", f"model={tiny_model_dir}", "--set", "dataset=qa.jsonl", "--set", "eval_dataset=qa.jsonl",
            "--set", "max_completion_length=6", "--set", "device=cpu"]


def test_eval_reports_accuracy(tmp_path, qa_setup):
    result = run_cli("eval", *qa_setup, "--output", "m.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["eval/num_prompts"] == 6 and 0.0 <= metrics["eval/accuracy"] <= 1.0
    assert "eval/accuracy:" in result.stdout


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
@pytest.mark.parametrize("bf16", [False, True])
def test_eval_of_the_final_model_equals_the_trainers_last_evaluation(tmp_path, qa_setup, bf16):
    """`grpokit eval` generates as the trainer's evaluation does (bf16 autocast included): same numbers."""
    write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"What is {a} - {b}?", "answer": str(a - b)} for a in range(3)
                                          for b in range(2)])
    common = [*qa_setup, "--set", "eval_dataset=held.jsonl", "--set", f"bf16={str(bf16).lower()}",
              "--set", "eval_num_samples=2", "--set", "eval_pass_k=[1, 2]", "--set", "temperature=1.0",
              "--set", "seed=3"]
    train = run_cli("train", *common, *TINY, "--set", "max_steps=2", "--set", "learning_rate=0.05", cwd=tmp_path)
    assert train.returncode == 0, train.stderr + train.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "eval/accuracy" in r][-1]
    result = run_cli("eval", *common, *TINY, "--model", "run/final_model", "--output", "m.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    shared = sorted(k for k in metrics if k in last and k != "eval/time")
    assert {"eval/accuracy", "eval/pass@2", "eval/completions/mean_length",
            "eval/sampled/completions/mean_length"} <= set(shared)
    for key in shared:
        assert metrics[key] == pytest.approx(last[key], abs=1e-9), key


def test_eval_and_filter_generate_under_bf16_autocast_when_bf16_is_set(tmp_path, tiny_model_dir, monkeypatch):
    """The tiny model's completions do not change under bf16, so the test above cannot see this: watch the engine."""
    import torch

    from grpokit.evaluation.inference import evaluate_model, filter_by_pass_rate
    from grpokit.rollout.torch_engine import TorchEngine

    seen = []
    generate = TorchEngine.generate
    monkeypatch.setattr(TorchEngine, "generate",
                        lambda self, *a, **k: seen.append(torch.is_autocast_enabled("cpu")) or generate(self, *a, **k))
    rows = [{"prompt": f"What is {a} - {b}?", "answer": str(a - b)} for a in range(3) for b in range(2)]
    data = str(write_jsonl(tmp_path / "held.jsonl", rows))
    for bf16 in (False, True):
        cfg = GRPOConfig(model=str(tiny_model_dir), dataset=data, eval_dataset=data, reward_funcs=["number_correct"],
                         max_completion_length=4, eval_num_samples=2, bf16=bf16, device="cpu",
                         output_dir=str(tmp_path / "out"))
        evaluate_model(cfg)
        filter_by_pass_rate(cfg, samples=2)
    assert seen and seen == [False] * (len(seen) // 2) + [True] * (len(seen) // 2)


def test_generate_writes_n_completions_per_prompt(tmp_path, qa_setup):
    result = run_cli("generate", *qa_setup, "-n", "3", "--limit", "2", "--output", "out.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and rows[0]["prompt"] == rows[2]["prompt"] == "What is 0 + 0?"
    assert all(isinstance(r["completion"], str) and r["finish_reason"] in ("stop", "length") for r in rows)


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_export_merges_a_lora_run(tmp_path, qa_setup):
    result = run_cli("train", *qa_setup, *TINY, "--set", "use_peft=true", "--set", "eval_dataset=null", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "final_model" / "adapter_config.json").is_file()
    result = run_cli("export", "run/final_model", "merged", "--merge", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "merged the LoRA adapter" in result.stdout
    assert (tmp_path / "merged" / "config.json").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_pipeline_example_runs_each_stage_on_the_previous_ones_output(tmp_path, tiny_model_dir):
    """examples/pipeline: data -> sft -> filter -> train -> eval --compare, each run.sh's command, on the tiny model."""
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    data = subprocess.run([sys.executable, "examples/pipeline/make_sft_data.py", "outputs/pipeline/sft_train.jsonl",
                           "--size", "16"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert data.returncode == 0, data.stderr
    first = json.loads((tmp_path / "outputs/pipeline/sft_train.jsonl").read_text().splitlines()[0])
    assert first["completion"].endswith(f"Answer: {first['answer']}")
    small = ["--set", "bf16=false", "--set", "device=cpu"]
    sft = run_cli("sft", "examples/pipeline/sft.yaml", "--set", f"model={tiny_model_dir}",
                  "--set", "num_train_epochs=null", "--set", "max_steps=2", *small, cwd=tmp_path)
    assert sft.returncode == 0, sft.stderr + sft.stdout
    sft_model = tmp_path / "outputs" / "pipeline" / "sft" / "final_model"
    assert (sft_model / "config.json").is_file()
    grpo = ["examples/pipeline/grpo.yaml", *small,
            "--set", "dataset=reasoning_gym:chain_sum?size=16&seed=1&max_terms=3",
            "--set", "max_completion_length=4", "--set", "eval_limit=4"]
    # a random tiny model is never right, so every prompt has pass rate 0: keep them all to train on
    filtered = run_cli("filter", *grpo, "--samples", "2", "--keep-all", "--output", "outputs/pipeline/filtered.jsonl",
                       cwd=tmp_path)
    assert filtered.returncode == 0, filtered.stderr + filtered.stdout
    rows = [json.loads(line) for line in (tmp_path / "outputs/pipeline/filtered.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all("pass_rate" in r for r in rows)
    train = run_cli("train", *grpo, "--set", "dataset=outputs/pipeline/filtered.jsonl", "--set", "max_steps=2",
                    "--set", "num_generations=2", "--set", "per_device_train_batch_size=4", "--set", "eval_steps=1",
                    "--set", "eval_num_samples=4", cwd=tmp_path)
    assert train.returncode == 0, train.stderr + train.stdout
    run = tmp_path / "outputs" / "pipeline" / "grpo"
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval/pass@4" in line]
    assert len(evals) >= 2 and (run / "best_model" / "best_metric.json").is_file()
    compare = run_cli("eval", *grpo, "--model", str(run / "final_model"), "--compare", str(sft_model),
                      "--samples", "4", "--k", "1,4", "--output", "compare.json", cwd=tmp_path)
    assert compare.returncode == 0, compare.stderr + compare.stdout
    result = json.loads((tmp_path / "compare.json").read_text())
    assert {"eval/accuracy", "eval/pass@4"} <= set(result["difference"])
