"""FAULTS.md rows 3, 5, 6, 11 and 12 through the real code path: degenerate groups in a real training step,
over-long and mixed prompts, tokenizer faults, config faults through the CLI, and an LLM judge's API key kept
out of every file of the run directory. tests/FAULTS_COVERAGE.md maps every row to its tests."""

import json
import logging
import math
import shutil

import pytest
import torch
import yaml

from grpokit.config import validate_config
from grpokit.errors import DataError
from grpokit.train.trainer import Trainer
from tests.conftest import build_tiny_model, run_cli, write_jsonl
from tests.unit.test_judge import reply, server  # noqa: F401 - server is the fake judge fixture

REWARDS = '''
def constant(completions, **kwargs):
    return [1.0] * len(completions)


def text_hash(completions, **kwargs):
    return [sum(i * ord(ch) for i, ch in enumerate(c, 1)) % 997 / 997 for c in completions]
'''
KEY = "sk-faultsTestSECRETneverLOGGED"  # no digits: a judge reply echoing it must not parse as a score


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    # prompts of different lengths, so that a batch of them needs padding
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"What is {a} + {b * 11}?", "answer": str(a + 11 * b)}
                                           for a in range(4) for b in range(3)])
    (tmp_path / "faults_rewards.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _config(model_dir, **overrides):
    return validate_config({"model": str(model_dir), "dataset": "train.jsonl", "output_dir": "run", "device": "cpu",
                            "reward_funcs": ["faults_rewards.text_hash"], "num_generations": 4,
                            "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                            "max_completion_length": 6, "learning_rate": 1e-2, "max_steps": 1, "seed": 2,
                            "save_steps": None, **overrides})


def _capture_micro_batches(trainer: Trainer) -> list:
    seen = []
    real = trainer.micro_batches

    def micro_batches(batch, advantages):
        made = real(batch, advantages)
        seen.extend(made)
        return made

    trainer.micro_batches = micro_batches
    return seen


def _step_metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]


def _assert_all_finite(metrics: dict) -> None:
    bad = {k: v for k, v in metrics.items() if not isinstance(v, (int, float)) or not math.isfinite(v)}
    assert not bad, f"non-finite metrics (metrics.jsonl writes NaN/inf as null): {bad}"


# --- row 3: degenerate groups ---------------------------------------------------------------------

def test_a_constant_reward_gives_advantage_exactly_zero_and_no_nan_in_a_real_step(workdir, tiny_model_dir):
    trainer = Trainer(_config(tiny_model_dir, reward_funcs=["faults_rewards.constant"], beta=0.1))
    seen = _capture_micro_batches(trainer)
    trainer.train()
    advantages = torch.cat([mb.advantages for mb in seen])
    assert advantages.numel() == 8
    assert torch.equal(advantages, torch.zeros_like(advantages))  # exactly 0: no 0/0 from a zero std
    (m,) = _step_metrics(workdir)
    _assert_all_finite(m)
    assert m["frac_reward_zero_std"] == 1.0 and m["reward_std"] == 0.0 and m["skipped_step"] == 0.0


@pytest.fixture(scope="module")
def never_ending_model_dir(tmp_path_factory):
    """The tiny model with an end-of-sequence token it cannot produce (outside its vocabulary): every
    completion runs to max_completion_length."""
    path = tmp_path_factory.mktemp("never-ending")
    model, tokenizer = build_tiny_model()
    vocab = model.config.vocab_size
    tokenizer.add_special_tokens({"eos_token": "<|never|>", "pad_token": "<unk>"})
    assert tokenizer.eos_token_id >= vocab
    model.config.eos_token_id = None
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_every_completion_truncated_is_logged_and_the_step_stays_finite(workdir, never_ending_model_dir,
                                                                         mask_truncated):
    trainer = Trainer(_config(never_ending_model_dir, max_completion_length=3, beta=0.1,
                              mask_truncated_completions=mask_truncated))
    seen = _capture_micro_batches(trainer)
    trainer.train()
    (m,) = _step_metrics(workdir)
    _assert_all_finite(m)
    assert m["completions/clipped_ratio"] == 1.0 and m["completions/mean_length"] == 3.0
    assert m["completions/mean_terminated_length"] == 0.0 and m["skipped_step"] == 0.0
    masked_tokens = int(sum(mb.completion_mask.sum() for mb in seen))
    assert masked_tokens == (0 if mask_truncated else 8 * 3)


# --- row 6: tokenizer faults ----------------------------------------------------------------------

def test_a_tokenizer_without_a_pad_token_pads_with_eos_and_says_so(workdir, tiny_model_dir, caplog):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny_model_dir).pad_token is None  # the fixture saves none
    with caplog.at_level(logging.INFO, logger="grpokit"):
        trainer = Trainer(_config(tiny_model_dir))
    assert trainer.tokenizer.pad_token == trainer.tokenizer.eos_token == "<|im_end|>"
    assert trainer.engine.pad_token_id == trainer.tokenizer.eos_token_id
    assert "tokenizer has no pad token: using eos '<|im_end|>'" in caplog.text


def test_a_right_padding_tokenizer_still_left_pads_and_the_trainer_scores_the_generated_ids(workdir, tiny_model_dir):
    from transformers import AutoTokenizer

    model_dir = shutil.copytree(tiny_model_dir, workdir / "right-padded")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir).padding_side == "right"

    trainer = Trainer(_config(model_dir))
    assert trainer.tokenizer.padding_side == "left"
    generated = []
    real_generate = trainer.engine.generate

    def generate(prompt_ids, n, params):
        rollout = real_generate(prompt_ids, n, params)
        generated.append(([list(p) for p in prompt_ids], n, [list(c) for c in rollout.completion_ids]))
        return rollout

    trainer.engine.generate = generate
    seen = _capture_micro_batches(trainer)
    trainer.train()

    ((prompts, n, completions),) = generated
    assert len({len(p) for p in prompts}) > 1  # the batch needed padding
    texts = {r["prompt"] for r in trainer.train_records}
    assert all(trainer.tokenizer.decode(p) in texts for p in prompts)
    expected = list(zip([p for p in prompts for _ in range(n)], completions, strict=True))
    scored = []
    for mb in seen:
        width_p = mb.input_ids.shape[1] - mb.completion_mask.shape[1]
        for ids, attention, cmask in zip(mb.input_ids, mb.attention_mask, mb.completion_mask, strict=True):
            prompt_part = ids[:width_p][attention[:width_p].bool()].tolist()
            pads = width_p - len(prompt_part)
            assert attention[:width_p].tolist() == [0] * pads + [1] * len(prompt_part)  # left padding
            scored.append((prompt_part, ids[width_p:][cmask.bool()].tolist()))
    assert scored == expected


def test_chat_data_with_a_tokenizer_lacking_a_chat_template_is_a_clear_error_before_training(workdir):
    model, tokenizer = build_tiny_model()
    tokenizer.chat_template = None
    model.save_pretrained(workdir / "no-template")
    tokenizer.save_pretrained(workdir / "no-template")
    write_jsonl(workdir / "chat.jsonl", [{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}],
                                          "answer": str(a + 1)} for a in range(8)])
    with pytest.raises(DataError, match="dataset 'chat.jsonl' has chat-message prompts but the tokenizer has no "
                                        "chat template; use plain-string prompts or a model whose tokenizer"):
        Trainer(_config(workdir / "no-template", dataset="chat.jsonl"))
    assert not (workdir / "run").exists()  # no step, no metrics, no checkpoint


# --- row 5: dataset faults ------------------------------------------------------------------------

def test_over_long_prompts_are_dropped_and_counted_the_same_way_for_train_and_eval(workdir, tiny_model_dir, caplog):
    long_question = "Please compute the following sum with care: "
    write_jsonl(workdir / "train.jsonl", [{"prompt": f"{long_question if a % 3 == 0 else ''}What is {a} + 1?",
                                           "answer": str(a + 1)} for a in range(9)])  # 3 of 9 over the limit
    write_jsonl(workdir / "held.jsonl", [{"prompt": f"{long_question if a < 2 else ''}What is {a} plus 2?",
                                          "answer": str(a + 2)} for a in range(5)])  # 2 of 5 over the limit
    cfg = _config(tiny_model_dir, eval_dataset="held.jsonl", eval_on_start=True, max_prompt_length=20,
                  eval_max_completion_length=2)
    with caplog.at_level(logging.WARNING, logger="grpokit"):
        trainer = Trainer(cfg)
    assert "dataset 'train.jsonl': dropped 3 of 9 prompts longer than max_prompt_length=20 tokens" in caplog.text
    assert "dataset 'held.jsonl': dropped 2 of 5 prompts longer than max_prompt_length=20 tokens" in caplog.text
    assert (trainer.train_data.dropped, len(trainer.train_data.prompt_ids)) == (3, 6)
    assert (trainer.eval_data.dropped, len(trainer.eval_data.prompt_ids)) == (2, 3)

    lengths = []
    real_generate = trainer.engine.generate
    trainer.engine.generate = lambda prompt_ids, *a, **k: lengths.extend(map(len, prompt_ids)) or real_generate(
        prompt_ids, *a, **k)
    result = trainer.train()
    assert result.eval_before["eval/num_prompts"] == 3
    assert lengths and max(lengths) <= 20  # the engine never sees an over-long prompt, in training or evaluation


def test_mixed_chat_and_plain_prompts_are_a_clear_error_before_any_model_loads(workdir):
    write_jsonl(workdir / "mixed.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"},
                                          {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "answer": "4"}])
    # the model path does not exist: had the model been loaded first, that error would show instead
    with pytest.raises(DataError, match="dataset 'mixed.jsonl', column 'prompt': mixes plain-string and "
                                        "chat-message prompts"):
        Trainer(_config("./no-model-here", dataset="mixed.jsonl"))
    assert not (workdir / "run").exists()


# --- row 11: config faults through the CLI --------------------------------------------------------

def test_wrong_types_and_out_of_range_values_name_every_key_before_anything_loads(tmp_path):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({
        "model": "./no-model-here", "dataset": "nowhere.jsonl", "output_dir": "run", "max_steps": "ten",
        "temperature": -0.5, "reward_funcs": [{"func": "length", "weight": "heavy"}]}))
    result = run_cli("train", "cfg.yaml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "cfg.yaml: invalid config" in result.stderr
    assert "max_steps: Input should be a valid integer" in result.stderr and "(got 'ten')" in result.stderr
    assert "temperature: Input should be greater than or equal to 0 (got -0.5)" in result.stderr
    assert "reward_funcs.0.RewardEntry.weight: Input should be a valid number" in result.stderr
    # neither the missing dataset nor the missing model was reached
    assert "nowhere.jsonl" not in result.stderr and "no-model-here" not in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


# --- row 12: an LLM judge's API key ---------------------------------------------------------------

def _echoing_judge(body, n):
    """A judge that echoes the key back in every way a server might: in a 5xx body, in a reply with no score,
    and from the second step on (request 9) in a 401 body."""
    if n > 8:
        return 401, {"error": {"message": f"Incorrect API key provided: Bearer {KEY}"}}
    if n % 4 == 1:
        return 500, {"error": {"message": f"overloaded while serving Bearer {KEY}"}}
    return reply(f"I was called with Bearer {KEY}" if n % 4 == 2 else "Fine.\nScore: 7")


def test_a_judge_api_key_never_reaches_the_run_directory_or_the_console(tmp_path, tiny_model_dir,
                                                                       server,  # noqa: F811 - the fixture imported above
                                                                       monkeypatch):
    server.respond = _echoing_judge
    monkeypatch.setenv("GRPOKIT_FAULTS_JUDGE_KEY", KEY)
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"What is {a} + 1?", "answer": str(a + 1)} for a in range(6)])
    judge = {"func": "llm_judge", "args": {"model": "judge", "base_url": server.base_url,
                                           "api_key_env": "GRPOKIT_FAULTS_JUDGE_KEY", "max_retries": 0,
                                           "timeout_s": 10}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "dataset": "train.jsonl", "output_dir": "run", "device": "cpu",
        "reward_funcs": [judge], "num_generations": 4, "per_device_train_batch_size": 8,
        "max_completion_length": 4, "max_steps": 2, "save_steps": 1, "seed": 0}))
    result = run_cli("train", "cfg.yaml", cwd=tmp_path)

    assert server.requests, result.stderr
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"  # read from the environment, sent
    # step 2: the judge answers 401, echoing the key; a wrong key stops the run, with the server's text redacted
    assert result.returncode == 2, result.stderr
    assert "answered 401 (the API key is wrong or missing" in result.stderr
    assert "Incorrect API key provided: Bearer <redacted>" in result.stderr
    run = tmp_path / "run"
    assert len(_step_metrics(tmp_path)) == 1
    log_text = (run / "training_log.txt").read_text()
    assert "completions unscored" in log_text and "<redacted>" in log_text  # step 1's echoes, logged redacted
    files = [p for p in run.rglob("*") if p.is_file()]
    names = {str(p.relative_to(run)) for p in files}
    assert {"config.yaml", "training_log.txt", "metrics.jsonl", "checkpoint-1/config.yaml"} <= names, names
    assert "GRPOKIT_FAULTS_JUDGE_KEY" in (run / "config.yaml").read_text()  # the variable's name, not its value
    leaked = [str(p.relative_to(run)) for p in files if KEY.encode() in p.read_bytes()]
    assert not leaked, f"API key written to {leaked}"
    assert KEY not in result.stdout and KEY not in result.stderr
