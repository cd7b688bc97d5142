"""`grpokit sft`: it learns the answers, trains on answer / assistant tokens only, writes a model `grpokit train`
starts from, names the config key when the data has no target, and checkpoints and resumes exactly."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from grpokit.config import GRPOConfig
from grpokit.data import loading as data
from grpokit.models.loading import prepare_tokenizer
from grpokit.runtime import allocator
from grpokit.train.sft import IGNORE_INDEX, build_examples, collate, load_sft_records
from tests.conftest import build_tokenizer, run_cli, write_jsonl

ROWS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(6) for b in range(5)]


def _config(tmp_path, tiny_model_dir, rows=ROWS, **overrides):
    write_jsonl(tmp_path / "train.jsonl", rows)
    config = {"model": str(tiny_model_dir), "dataset": "train.jsonl", "output_dir": "run", "max_steps": 25,
              "learning_rate": 3e-3, "per_device_train_batch_size": 8, "max_completion_length": 8, "seed": 0,
              "device": "cpu", "report_to": "none", **overrides}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "cfg.yaml"


def _answer_logprobs(model_dir, rows) -> tuple[float, float]:
    """Mean log-prob per answer token (answer + EOS after the plain-string prompt), and per digit alone (EOS left
    out: an SFT that learned only to stop would raise the first), with transformers alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    every, digits = [], []
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer(row["prompt"])["input_ids"]
            answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            logits = model(torch.tensor([prompt + answer])).logits[0]
            logprobs = torch.log_softmax(logits[len(prompt) - 1:-1].double(), dim=-1)
            token_logprobs = logprobs[torch.arange(len(answer)), torch.tensor(answer)].tolist()
            every += token_logprobs
            digits += token_logprobs[:-1]
    return sum(every) / len(every), sum(digits) / len(digits)


def test_sft_lowers_the_loss_and_raises_the_answers_likelihood(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir)
    result = run_cli("sft", cfg.name, cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    run = tmp_path / "run"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == list(range(1, 26))
    for m in steps:
        assert m["grad_norm"] > 0 and m["learning_rate"] == 3e-3 and m["tokens"] >= 16  # 8 rows x (>= 1 digit + EOS)
    # random init: ~ln(vocab) = 4.6 nats per token; the answers are one or two digits and EOS
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.5, [m["loss"] for m in steps]
    (before, digits_before), (after, digits_after) = (_answer_logprobs(tiny_model_dir, ROWS),
                                                      _answer_logprobs(run / "final_model", ROWS))
    assert after > before + 1.5 and digits_after > digits_before + 1.0, (before, after, digits_before, digits_after)
    assert yaml.safe_load((run / "config.yaml").read_text())["learning_rate"] == 3e-3
    assert "train loss" in result.stdout and f"saved {run.relative_to(tmp_path) / 'final_model'}" in result.stdout
    assert "grpokit train cfg.yaml --preset from_sft --sft-model run/final_model" in result.stdout


@pytest.mark.parametrize("setting", ["onednn", "torch"])
def test_sft_puts_linear_layers_on_the_kernel_the_setting_names(tmp_path, tiny_model_dir, setting):
    """cpu_linear applies to SFT as to GRPO: said in the summary line; the saved model is a plain transformers one."""
    cfg = _config(tmp_path, tiny_model_dir, max_steps=2, cpu_linear=setting)
    result = run_cli("sft", cfg.name, cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert ("(float32 linear layers on oneDNN)" in result.stdout) is (setting == "onednn"), result.stdout
    lines = result.stdout.splitlines()
    summary = next(i for i, line in enumerate(lines) if line.startswith("SFT of "))
    assert lines[summary + 1].startswith("bf16: auto -> "), result.stdout  # the summary: what auto chose, and why
    restarts = allocator.choose() is not None  # sft restarts on tcmalloc as train does (grpokit.runtime.allocator)
    assert ("C allocator: tcmalloc" in result.stdout) is restarts and "C allocator: " in result.stdout, result.stdout
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final_model")
    assert all(type(m) is torch.nn.Linear for m in saved.modules() if isinstance(m, torch.nn.Linear))
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert saved.state_dict().keys() == start.keys()
    assert any(not torch.equal(saved.state_dict()[k], start[k]) for k in start), "two steps changed the weights"


def _cfg(**overrides) -> GRPOConfig:
    return GRPOConfig(dataset="rows", **overrides)


def _check_labels(batch, prompt_ids, target_ids):
    """Row i: the real tokens are prompt + target; labels are the target there and IGNORE_INDEX everywhere else."""
    for i, (prompt, target) in enumerate(zip(prompt_ids, target_ids, strict=True)):
        real = batch.attention_mask[i].bool()
        assert batch.input_ids[i][real].tolist() == prompt + target
        assert batch.labels[i][real].tolist() == [IGNORE_INDEX] * len(prompt) + target
        assert (batch.labels[i][~real] == IGNORE_INDEX).all()  # padding, on both sides
    assert (~batch.attention_mask.bool()).any(), "the rows should differ in length, so padding is tested"


def test_labels_cover_the_answer_and_eos_only_plain_and_chat_prompts():
    tokenizer = prepare_tokenizer(build_tokenizer())
    answers = ["5", "a much longer answer"]
    for prompts in (["What is 2 + 3?", "Hi?"],
                    [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "Hi?"}]]):
        records = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]
        examples, dropped = build_examples(records, tokenizer, _cfg())
        assert dropped == 0
        batch = collate(examples, tokenizer.pad_token_id)
        grpo_prompts = data.tokenise_prompts(records, tokenizer, None, "rows").prompt_ids  # what GRPO would sample from
        targets = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in answers]
        _check_labels(batch, grpo_prompts, targets)
    assert tokenizer.decode(grpo_prompts[0]).endswith("<|im_start|>assistant\n")


def test_rows_over_the_limits_are_dropped():
    tokenizer = prepare_tokenizer(build_tokenizer())
    records = [{"prompt": "short?", "answer": "12"}, {"prompt": "a" * 40, "answer": "1"},
               {"prompt": "ok?", "answer": "9" * 20}]
    examples, dropped = build_examples(records, tokenizer, _cfg(max_prompt_length=10, max_completion_length=5))
    assert dropped == 2 and [tokenizer.decode(e.completion_ids) for e in examples] == ["12<|im_end|>"]


def test_messages_rows_train_on_assistant_turns_only(tmp_path):
    tokenizer = prepare_tokenizer(build_tokenizer())
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"},
                    {"role": "assistant", "content": "5"}, {"role": "user", "content": "and times 4?"},
                    {"role": "assistant", "content": "20, since 5 x 4 = 20"}]
    write_jsonl(tmp_path / "chats.jsonl", [{"messages": conversation}, {"messages": conversation[1:3]}])
    cfg = GRPOConfig(dataset=str(tmp_path / "chats.jsonl"))
    examples, _ = build_examples(load_sft_records(cfg), tokenizer, cfg)
    batch = collate(examples, tokenizer.pad_token_id)
    for row, expected in ((0, ["5<|im_end|>", "20, since 5 x 4 = 20<|im_end|>"]), (1, ["5<|im_end|>"])):
        labelled = (batch.labels[row] != IGNORE_INDEX).tolist()
        spans, start = [], None
        for pos, on in enumerate([*labelled, False]):
            if on and start is None:
                start = pos
            if not on and start is not None:
                spans.append(tokenizer.decode(batch.input_ids[row, start:pos]))
                start = None
        assert spans == expected
        assert batch.labels[row][batch.labels[row] != IGNORE_INDEX].tolist() == \
            batch.input_ids[row][batch.labels[row] != IGNORE_INDEX].tolist()
    # the prompt is GRPO's prompt for the conversation before the first reply
    grpo_prompt = data.tokenise_prompts([{"prompt": conversation[1:2]}], tokenizer, None, "x").prompt_ids[0]
    assert examples[1].prompt_ids == grpo_prompt


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_lora_sft_writes_a_merged_model_grpo_trains_from(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, use_peft=True, lora_r=4, max_steps=2, learning_rate=1e-2,
                  num_generations=4, max_completion_length=6)
    result = run_cli("sft", cfg.name, cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    merged = tmp_path / "run" / "final_model"
    assert not (merged / "adapter_config.json").exists()
    base, after = load_file(tiny_model_dir / "model.safetensors"), load_file(merged / "model.safetensors")
    assert base.keys() == after.keys(), "a plain model: the base's parameter names, no lora_A/lora_B"
    assert any(not torch.equal(base[k], after[k]) for k in base if "q_proj" in k), "the adapters were merged in"
    # the command sft prints, for one step
    command = next(line for line in result.stdout.splitlines() if "continue with GRPO:" in line)
    argv = shlex.split(command.split("grpokit ", 1)[1])
    assert argv[:2] == ["train", "cfg.yaml"] and "--sft-model" in argv and "--output-dir" in argv
    grpo = run_cli(*argv, "--set", "max_steps=1", cwd=tmp_path)
    assert grpo.returncode == 0, grpo.stderr + grpo.stdout
    assert (tmp_path / "run-grpo" / "final_model").is_dir() and (merged / "model.safetensors").is_file()


def test_missing_target_column_names_the_columns_and_the_key(tmp_path, tiny_model_dir):
    rows = [{"prompt": "What is 1 + 1?", "label": "2"}]
    cfg = _config(tmp_path, tiny_model_dir, rows=rows)
    result = run_cli("sft", cfg.name, cwd=tmp_path)
    assert result.returncode == 2
    assert "sft_target_column" in result.stderr and "['label', 'prompt']" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_sft_defaults_replace_grpo_defaults_only_where_unset():
    from grpokit.config import load_config
    from grpokit.train.sft import sft_defaults

    plain = sft_defaults(load_config(None))
    assert (plain.learning_rate, plain.num_train_epochs, plain.output_dir) == (2e-5, 1.0, "outputs/sft")
    assert sft_defaults(load_config(None, ["use_peft=true"])).learning_rate == 2e-4
    mine = sft_defaults(load_config(None, ["learning_rate=1e-6", "max_steps=7", "output_dir=out"]))
    assert (mine.learning_rate, mine.max_steps, mine.num_train_epochs, mine.output_dir) == (1e-6, 7, None, "out")


def _same_final_weights(a, b) -> None:
    first = load_file(a / "final_model" / "model.safetensors")
    second = load_file(b / "final_model" / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


# the adapter's own reload is GRPO's (checkpoint.load_weights, tested in test_resume.py): LoRA runs with the slow tests
@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_resumed_from_a_checkpoint_equals_the_straight_run(tmp_path, tiny_model_dir, lora):
    """N steps, resume, N more = 2N steps: the same losses after the checkpoint and bit-identical final weights.
    30 rows, 8 per micro-batch, 2 per step: the epoch ends inside step 2, so the saved data order matters."""
    cfg = _config(tmp_path, tiny_model_dir, max_steps=6, save_steps=3, gradient_accumulation_steps=2, use_peft=lora,
                  lora_r=4, lora_alpha=8, lora_target_modules="all-linear", learning_rate=3e-3 if lora else 1e-3)
    straight = run_cli("sft", cfg.name, cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr + straight.stdout
    run = tmp_path / "run"
    state = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["kind"] == "sft" and state["global_step"] == 3 and len(state["order"]) == 30 - 3 * 16 % 30
    assert (run / "checkpoint-3" / ("adapter_model.safetensors" if lora else "model.safetensors")).is_file()
    resumed = run_cli("sft", cfg.name, "--resume", "run/checkpoint-3", "--set", "output_dir=resumed", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert "resumed from run/checkpoint-3: step 3 of 6" in resumed.stdout
    losses = {m["step"]: m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    again = {m["step"]: m["loss"]
             for m in map(json.loads, (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines())}
    assert sorted(again) == [4, 5, 6] and all(again[s] == losses[s] for s in again), (losses, again)
    _same_final_weights(run, tmp_path / "resumed")


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_a_signal_stops_sft_with_a_checkpoint_that_resumes(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, max_steps=100_000, lr_scheduler_type="constant", save_steps=None)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRPOKIT_CACHE": str(tmp_path / ".cache")}
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "grpokit", "sft", cfg.name], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 120
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    text = (tmp_path / "out.txt").read_text()
    assert rc == 128 + signal.SIGTERM, text
    saved = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert len(saved) == 1 and f"checkpoint written to {saved[0].relative_to(tmp_path)}" in text, text
    assert f"grpokit sft {cfg.name} --resume" in text and not (tmp_path / "run" / "final_model").exists()
    step = json.loads((saved[0] / "trainer_state.json").read_text())["global_step"]
    resumed = run_cli("sft", cfg.name, "--resume", "--set", f"max_steps={step + 2}", cwd=tmp_path)  # constant lr
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 3)) and (tmp_path / "run" / "final_model").is_dir()


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_sft_and_grpo_checkpoints_are_not_mixed_up_and_a_changed_setting_is_refused(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, max_steps=2, save_steps=1)
    assert run_cli("sft", cfg.name, cwd=tmp_path).returncode == 0
    changed = run_cli("sft", cfg.name, "--resume", "--set", "learning_rate=1e-2", cwd=tmp_path)
    assert changed.returncode == 2
    assert "settings that change the results: learning_rate: 0.003 -> 0.01" in changed.stderr
    grpo = run_cli("train", cfg.name, "--resume", "run/checkpoint-1", "--set", "dataset=arithmetic",
                   "--set", "num_generations=2", "--set", "save_steps=null", cwd=tmp_path)
    assert grpo.returncode == 2, grpo.stderr
    assert "a `grpokit sft` checkpoint, not a `grpokit train` one" in grpo.stderr, grpo.stderr
    # nothing loaded
    assert "grpokit sft CONFIG --resume run/checkpoint-1" in grpo.stderr and "model " not in grpo.stdout
    grpo_checkpoint = tmp_path / "grpo" / "checkpoint-9"  # what `grpokit train` writes: no "kind"
    grpo_checkpoint.mkdir(parents=True)
    (grpo_checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 9, "generations": 3}))
    foreign = run_cli("sft", cfg.name, "--resume", "grpo/checkpoint-9", cwd=tmp_path)
    assert foreign.returncode == 2 and "a `grpokit train` checkpoint, not a `grpokit sft` one" in foreign.stderr
    forced = run_cli("sft", cfg.name, "--force", cwd=tmp_path)
    assert forced.returncode == 2 and "--force only applies with --resume" in forced.stderr
    nothing = run_cli("sft", cfg.name, "--resume", "--set", "output_dir=empty", cwd=tmp_path)
    assert nothing.returncode == 2 and "--resume: no checkpoint in empty" in nothing.stderr, nothing.stderr
    assert "SFT of" not in nothing.stdout + nothing.stderr  # said before the model loads


def test_max_train_seconds_ends_sft_after_the_step_that_spends_it(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, max_steps=6, save_steps=None, max_train_seconds=0.001)
    result = run_cli("sft", cfg.name, cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "max_train_seconds 0.001 reached (" in result.stdout and "the run ends after step 1 of 6" in result.stdout
    steps = [m["step"] for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    assert steps == [1]
    assert (tmp_path / "run" / "final_model" / "model.safetensors").is_file()
    assert not list((tmp_path / "run").glob("checkpoint-*"))  # save_steps None: final_model only, as at max_steps
