"""`grpokit train` through the real CLI on a tiny random model built by the test (no download)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli, write_jsonl

REWARDS = '''
def text_hash_reward(completions, **kwargs):
    """Differs between any two different completions (almost surely), so every group has a spread."""
    return [sum(i * ord(ch) for i, ch in enumerate(c, 1)) % 997 / 997 for c in completions]
'''


def _setup(tmp_path, tiny_model_dir, **overrides):
    rows = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(5) for b in range(4)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"What is {a} plus {b}?", "answer": str(a + b)} for a, b in
                                           ((1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4))])
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    config = {
        "model": str(tiny_model_dir), "dataset": "train.jsonl", "eval_dataset": "held.jsonl", "eval_on_start": True,
        "output_dir": "run", "reward_funcs": ["my_rewards.text_hash_reward", "number_correct"],
        "reward_weights": [1.0, 1.0], "num_generations": 4, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2, "max_completion_length": 12, "learning_rate": 1e-2, "max_steps": 3,
        "beta": 0.1, "seed": 1, "device": "cpu", **overrides,
    }
    import yaml

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "cfg.yaml"


@pytest.mark.parametrize("cpu_linear", ["onednn", "torch"])
def test_train_changes_every_parameter_and_writes_the_run(tmp_path, tiny_model_dir, cpu_linear):
    cfg = _setup(tmp_path, tiny_model_dir, cpu_linear=cpu_linear)
    result = run_cli("train", str(cfg), cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert ("(float32 linear layers on oneDNN)" in result.stdout) == (cpu_linear == "onednn")
    run = tmp_path / "run"

    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(run / "final_model" / "model.safetensors")
    assert before.keys() == after.keys()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"parameters not updated: {unchanged}"

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        for key in ("reward", "reward_std", "kl", "completions/mean_length", "loss", "grad_norm", "entropy",
                    "rewards/text_hash_reward/mean", "rewards/number_correct/mean", "frac_reward_zero_std",
                    "clip_ratio/region_mean", "time/generate", "time/update", "learning_rate"):
            assert key in m and m[key] is not None, key
        assert m["reward_std"] > 0 and m["grad_norm"] > 0
    evals = [m for m in lines if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [0, 3] and evals[0]["eval/num_prompts"] == 6
    per_prompt = [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]
    assert [(e["step"], e["label"]) for e in per_prompt] == [(0, "before training"), (3, "after training")]
    for record, metrics in zip(per_prompt, evals, strict=True):  # the per-prompt values behind eval/accuracy (here
        # the accuracy reward is text_hash_reward, in [0, 1])
        scored = [v for v in record["accuracy"] if v is not None]
        assert len(record["accuracy"]) == 6 and all(0 <= v <= 1 for v in scored)
        assert sum(scored) / len(scored) == pytest.approx(metrics["eval/accuracy"])

    assert "held-out accuracy" in result.stdout
    resolved = (run / "config.yaml").read_text()
    assert "beta: 0.1" in resolved and "max_steps: 3" in resolved
    log_text = (run / "training_log.txt").read_text()
    assert "held-out accuracy before training" in log_text and "saved" in log_text

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "final_model")
    tokenizer = AutoTokenizer.from_pretrained(run / "final_model")
    assert model(torch.tensor([tokenizer("1 + 1")["input_ids"]])).logits.isfinite().all()


def test_no_kl_metric_and_no_reference_when_beta_is_zero(tmp_path, tiny_model_dir):
    cfg = _setup(tmp_path, tiny_model_dir, beta=0.0, max_steps=1, eval_dataset=None)
    result = run_cli("train", str(cfg), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (line,) = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert "kl" not in json.loads(line)


def test_unknown_key_exits_nonzero_naming_it(tmp_path, tiny_model_dir):
    cfg = _setup(tmp_path, tiny_model_dir, num_generatons=4)
    result = run_cli("train", str(cfg), cwd=tmp_path)
    assert result.returncode == 2
    assert "num_generatons: unknown key; did you mean 'num_generations'?" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("field", ["dataset", "eval_dataset"])
def test_missing_dataset_file_exits_nonzero_naming_it(tmp_path, tiny_model_dir, field):
    cfg = _setup(tmp_path, tiny_model_dir, **{field: "data/nowhere.jsonl"})
    result = run_cli("train", str(cfg), cwd=tmp_path)
    assert result.returncode == 2
    assert "dataset file 'data/nowhere.jsonl' does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was started


def test_bad_geometry_is_rejected_before_loading(tmp_path, tiny_model_dir):
    result = run_cli("train", "--set", "num_generations=3", "--set", "per_device_train_batch_size=8",
                     "--set", "model=/does/not/exist", cwd=tmp_path)
    assert result.returncode == 2
    assert "not divisible by num_generations = 3" in result.stderr and "Traceback" not in result.stderr


def test_held_out_prompts_that_are_training_prompts_are_left_out(tmp_path, tiny_model_dir):
    cfg = _setup(tmp_path, tiny_model_dir)
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    write_jsonl(tmp_path / "held.jsonl", rows[:2] + [{"prompt": "What is 9 plus 9?", "answer": "18"}])
    result = run_cli("train", str(cfg), "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 of 3 prompts are also training prompts" in result.stderr and "1 held-out" in result.stdout
    write_jsonl(tmp_path / "held.jsonl", rows[:2])
    result = run_cli("train", str(cfg), cwd=tmp_path)
    assert result.returncode == 2 and "all 2 prompts are also in the training data" in result.stderr


def test_dry_run_validates_without_training(tmp_path, tiny_model_dir):
    cfg = _setup(tmp_path, tiny_model_dir)
    result = run_cli("train", str(cfg), "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "dry run: 20 train prompts, 6 held-out" in result.stdout
    assert not (tmp_path / "run").exists()


def test_unreachable_model_is_a_clear_error(tmp_path):
    result = run_cli("train", "--set", "model=no-such-org/no-such-model", "--set", "max_steps=1", cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot load 'no-such-org/no-such-model'" in result.stderr and "Traceback" not in result.stderr


def test_check_prints_every_key_with_its_help(tmp_path):
    result = run_cli("check", "--set", "beta=0.3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "beta: 0.3  # KL coefficient" in result.stdout
    assert "num_generations: 8  # Completions sampled per prompt" in result.stdout


@pytest.mark.parametrize("dry_run", [False, True])
def test_reward_argument_matching_no_column_fails_before_the_model_loads(tmp_path, tiny_model_dir, dry_run):
    (tmp_path / "needy.py").write_text("def needs_topic(completions, topic):\n    return [0.0] * len(completions)\n")
    # the model path does not exist: had the model been loaded first, that error would show instead
    cfg = _setup(tmp_path, tiny_model_dir, reward_funcs=["needy.needs_topic"], reward_weights=None,
                 model="./no-model-here")
    result = run_cli("train", str(cfg), *(["--dry-run"] if dry_run else []), cwd=tmp_path)
    assert result.returncode == 2
    assert "'needs_topic' needs argument 'topic', which matches no dataset column" in result.stderr
    assert "Traceback" not in result.stderr


EARLY_FAULTS = {
    "unknown best metric": ({"metric_for_best_model": "accuracyy"},
                            "metric_for_best_model 'accuracyy' is not an eval metric of this run (did you mean "
                            "'eval/accuracy'?)"),
    "best metric without held-out data": ({"metric_for_best_model": "accuracy", "eval_dataset": None},
                                          "metric_for_best_model 'accuracy' needs eval_dataset"),
    "reward argument matching no column": ({"reward_funcs": ["needy.needs_topic"], "reward_weights": None},
                                           "'needs_topic' needs argument 'topic', which matches no dataset column"),
}
COMMANDS = {"train": ["train"], "dry run": ["train", "--dry-run"], "check": ["check", "--quiet-config"]}


@pytest.mark.parametrize("fault", EARLY_FAULTS)
@pytest.mark.parametrize("command", COMMANDS)
def test_train_dry_run_and_check_make_the_same_early_checks(tmp_path, tiny_model_dir, command, fault):
    """One set of checks (evaluation/preflight.py's early_checks): each fault fails the same in all three commands,
    before any model loads (the model path does not exist: a model load would fail with another error)."""
    (tmp_path / "needy.py").write_text("def needs_topic(completions, topic):\n    return [0.0] * len(completions)\n")
    overrides, message = EARLY_FAULTS[fault]
    cfg = _setup(tmp_path, tiny_model_dir, model="./no-model-here", **overrides)
    result = run_cli(*COMMANDS[command][:1], str(cfg), *COMMANDS[command][1:], cwd=tmp_path)
    assert message in result.stderr + result.stdout, (result.stdout, result.stderr)
    assert result.returncode == (1 if command == "check" and "column" in fault else 2), result.stderr
    assert "Traceback" not in result.stderr and "no-model-here" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_on_collapse_stop_ends_the_run_at_the_collapse_as_max_steps_would(tmp_path, tiny_model_dir):
    """Greedy rollouts (temperature 0): every group is 4 copies of one completion, so identical_completions fires
    once its 10-step window is full; with on_collapse stop the run ends there, evaluated and saved."""
    cfg = _setup(tmp_path, tiny_model_dir, temperature=0.0, max_steps=14, on_collapse="stop", beta=0.0,
                 eval_on_start=False, save_steps=100, gradient_accumulation_steps=1)
    result = run_cli("train", str(cfg), cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    run = tmp_path / "run"
    alerts = [json.loads(line) for line in (run / "alerts.jsonl").read_text().splitlines()]
    collapse = next(a for a in alerts if a["name"] == "identical_completions")
    assert f"on_collapse stop: identical_completions at step {collapse['step']}: the run ends after step " \
           f"{collapse['step']} of 14" in result.stdout
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == list(range(1, collapse["step"] + 1))
    assert [m["step"] for m in lines if "eval/accuracy" in m] == [collapse["step"]]  # the final evaluation
    assert (run / "final_model" / "model.safetensors").is_file() and (run / f"checkpoint-{collapse['step']}").is_dir()


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_on_collapse_adapt_raises_the_temperature_from_the_next_generation_and_resumes_with_it(tmp_path,
                                                                                               tiny_model_dir):
    """Greedy rollouts (temperature 0) until identical_completions fires at step S; with on_collapse adapt the
    generations after step S sample (and score their log-probs) at the raised temperature, capped at
    adapt_max_temperature; a generation already under way keeps its own. A resume from a checkpoint after the
    raise, in the middle of a generation, goes on with it and logs the same steps as the run that did not stop."""
    cfg = _setup(tmp_path, tiny_model_dir, temperature=0.0, max_steps=16, on_collapse="adapt", beta=0.0,
                 adapt_temperature_step=1.5, adapt_max_temperature=1.0, eval_on_start=False, eval_dataset=None,
                 save_steps=13, gradient_accumulation_steps=1, steps_per_generation=2)
    result = run_cli("train", str(cfg), cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    run = tmp_path / "run"
    alerts = [json.loads(line) for line in (run / "alerts.jsonl").read_text().splitlines()]
    raised_at = min(a["step"] for a in alerts if a["name"] in ("identical_completions", "entropy_collapse"))
    said = " ".join((result.stdout + result.stderr).split())
    assert (f"on_collapse adapt: the sampling temperature goes from 0 to 1 from the next generation on (step "
            f"{raised_at}); that is adapt_max_temperature") in said
    assert said.count("on_collapse adapt:") == 1  # at the ceiling: later alerts raise nothing
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first_new = next(s for s in range(raised_at + 1, 17) if (s - 1) % 2 == 0)  # generations start at odd steps
    assert raised_at < 13 and first_new <= 13
    assert {m["step"]: m["temperature"] for m in lines} == {s: 0.0 if s < first_new else 1.0 for s in range(1, 17)}
    before = [m["completions/frac_identical_in_group"] for m in lines if m["step"] < first_new]
    after = [m["completions/frac_identical_in_group"] for m in lines if m["step"] >= first_new]
    assert set(before) == {1.0} and sum(after) / len(after) < 1.0  # sampling, not greedy, after the raise
    state = json.loads((run / "checkpoint-13" / "trainer_state.json").read_text())
    assert state["temperature"] == 1.0

    resumed = run_cli("train", str(cfg), "--resume", str(run / "checkpoint-13"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    again = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    def same(m):
        return {k: v for k, v in m.items() if not k.startswith("time") and k not in ("step_time",
                                                                                    "tokens_per_second")}
    assert [same(m) for m in again] == [same(m) for m in lines]


SPEC_REWARD = '''
from grpokit import RewardSpec


class Overlap(RewardSpec):
    def compute_reward(self, prompts, completions, **kwargs):
        scores = [len(set(c) & set(p)) / max(len(set(p)), 1) for p, c in zip(prompts, completions)]
        self.log_metrics({"mean_overlap": sum(scores) / len(scores), "nested_value": 1.0})
        return scores
'''


def test_no_metric_name_is_a_path_prefix_of_another(tmp_path, tiny_model_dir):
    """Every name a run with most features on logs (eval, validation, KL, several rewards, a RewardSpec's own
    metrics, dynamic sampling, skipped steps' counters, timers): none is also the prefix of another, which MLflow's
    file store and TensorBoard's tags cannot hold (`time/rewards` beside `time/rewards/NAME` crashed MLflow)."""
    from grpokit.observe.metrics import name_collisions

    (tmp_path / "spec_reward.py").write_text(SPEC_REWARD)
    write_jsonl(tmp_path / "valid.jsonl", [{"prompt": f"Add {a} and {b}.", "answer": str(a + b)} for a, b in
                                            ((1, 1), (2, 5), (6, 3))])
    cfg = _setup(tmp_path, tiny_model_dir, max_steps=2, eval_steps=1, validation_dataset="valid.jsonl",
                 dynamic_sampling=True, max_resample_rounds=1, log_completions_steps=1,
                 reward_funcs=["my_rewards.text_hash_reward", "number_correct", "spec_reward.Overlap"],
                 reward_weights=[1.0, 1.0, 0.5])
    result = run_cli("train", str(cfg), cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    names = set()
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        names |= set(json.loads(line))
    assert {"kl", "time/rewards", "time/reward/text_hash_reward", "rewards/Overlap/mean_overlap",
            "rewards/Overlap/nested_value", "timestamp", "validation/accuracy"} <= names, sorted(names)
    assert name_collisions(names) == []
    assert name_collisions(["time/rewards", "time/rewards/x", "time/rewardsx"]) == [("time/rewards", "time/rewards/x")]


def _tree(root):
    """Every file under `root`, by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_a_second_run_never_overwrites_a_finished_one(tmp_path, tiny_model_dir):
    cfg = _setup(tmp_path, tiny_model_dir, max_steps=3, save_steps=1, log_completions_steps=1, eval_on_start=False)
    first = run_cli("train", str(cfg), cwd=tmp_path)
    assert first.returncode == 0, first.stderr + first.stdout
    run = tmp_path / "run"
    before = _tree(run)
    assert any(k.startswith("checkpoint-2/") for k in before) and "final_model/config.json" in before

    again = run_cli("train", str(cfg), "--set", "max_steps=1", cwd=tmp_path)  # refused, before the model loads
    assert again.returncode == 2, again.stdout + again.stderr
    logged = len(before["metrics.jsonl"].decode().splitlines())  # 3 steps and the final evaluation
    assert f"output_dir 'run' holds a run ({logged} logged step(s) in metrics.jsonl" in again.stderr
    assert "checkpoint-2" in again.stderr and "final_model" in again.stderr
    assert "--resume" in again.stderr and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    assert _tree(run) == before  # byte for byte

    both = run_cli("train", str(cfg), "--resume", "--overwrite", cwd=tmp_path)
    assert both.returncode == 2 and "give one" in both.stderr

    fresh = run_cli("train", str(cfg), "--set", "max_steps=1", "--overwrite", cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and f"is now in {moved[0].name}" in fresh.stdout
    assert _tree(moved[0]) == before  # the old run, whole, under its new name
    new = _tree(run)
    steps = [json.loads(line)["step"] for line in new["metrics.jsonl"].decode().splitlines()]
    assert set(steps) == {1} and "final_model/config.json" in new  # step 1 and its final evaluation
    assert not [k for k in new if k.startswith(("checkpoint-2", "checkpoint-3", "completions/step_2",
                                                "completions/step_3"))]  # nothing of the old run mixed in


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_sft_into_a_run_directory_is_refused_too(tmp_path, tiny_model_dir):
    cfg = _setup(tmp_path, tiny_model_dir, max_steps=1, per_device_train_batch_size=4,
                 gradient_accumulation_steps=1)
    first = run_cli("sft", str(cfg), cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    before = _tree(tmp_path / "run")
    again = run_cli("sft", str(cfg), cwd=tmp_path)
    assert again.returncode == 2 and "output_dir 'run' holds a run" in again.stderr
    assert "grpokit sft" in again.stderr and _tree(tmp_path / "run") == before
