"""The GRPO options as the trainer runs them, on a tiny random model (in-process and through the CLI)."""

import json

import pytest
import torch
import yaml

from grpokit.config import validate_config
from grpokit.errors import ConfigError
from grpokit.train.trainer import Generation, Trainer
from tests.conftest import run_cli, write_jsonl

REWARDS = '''
def digit_fraction(completions, **kwargs):
    """Learnable by a tiny model: the share of characters that are digits."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def text_hash(completions, **kwargs):
    return [sum(i * ord(ch) for i, ch in enumerate(c, 1)) % 997 / 997 for c in completions]


def constant_for_c(completions, kind, **kwargs):
    """Constant on prompts of kind C (zero spread), varying on kind V."""
    return [1.0 if k == "C" else sum(i * ord(ch) for i, ch in enumerate(c, 1)) % 997 / 997
            for c, k in zip(completions, kind)]
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    rows = [{"prompt": f"{kind}: what is {a} + {b}?", "answer": str(a + b), "kind": kind}
            for a in range(6) for b in range(4) for kind in ("C", "V")]
    write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return tmp_path


def make_config(model_dir, **overrides):
    base = {"model": str(model_dir), "dataset": "train.jsonl", "output_dir": "run", "device": "cpu",
            "reward_funcs": ["my_rewards.text_hash"], "num_generations": 4, "per_device_train_batch_size": 8,
            "max_completion_length": 10, "learning_rate": 1e-2, "max_steps": 1, "seed": 3,
            "bf16": False}  # float32 on every machine: these tests compare against float32 references
    return validate_config({**base, **overrides})


def _state(trainer):
    return {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}


def _generation(trainer) -> tuple[list, dict[str, float]]:
    """A new generation's micro-batches (old and reference log-probs filled in) and its metrics."""
    pending = trainer.next_generation()
    return pending.micro_batches, pending.metrics


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_accumulation_1x8_equals_8x1(workdir, tiny_model_dir, loss_type):
    results = []
    for per_device, accum in ((8, 1), (1, 8)):
        # rows whole in both: a shared prompt forward sums the group's prompt gradients inside the float32 RMSNorm
        # (~1e-7 apart, tested in test_rollout_logprobs); this test holds the accumulation arithmetic to 1e-10
        cfg = make_config(tiny_model_dir, per_device_train_batch_size=per_device, gradient_accumulation_steps=accum,
                          torch_dtype="float64", beta=0.1, loss_type=loss_type, output_dir=f"run{per_device}",
                          share_prompt_forward=False)
        trainer = Trainer(cfg)
        batch, _ = _generation(trainer)
        metrics = trainer.updater.update(batch)
        results.append((_state(trainer), metrics))
    (state_a, m_a), (state_b, m_b) = results
    assert m_a["grad_norm"] > 0
    assert m_a["loss"] == pytest.approx(m_b["loss"], rel=1e-10, abs=1e-12)
    assert m_a["grad_norm"] == pytest.approx(m_b["grad_norm"], rel=1e-10)  # Adam's first step hides a scale error
    for name in state_a:
        torch.testing.assert_close(state_a[name], state_b[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("loss_type,num_iterations", [("grpo", 1), ("bnpo", 1), ("dr_grpo", 1), ("dapo", 2)])
def test_skipping_the_backward_of_silent_rows_gives_the_same_step(workdir, tiny_model_dir, loss_type, num_iterations):
    """Kind-C groups have zero spread (advantage exactly 0): the update that skips their backward pass gives the
    same loss, gradient norm, metrics and weights as the one that trains on every row, in float64; so does a
    following window where every row is silent (AdamW's momentum step still taken), and with several passes the
    second pass (old log-probs stored, the ratio moves). With one pass the silent rows' entropy (a metric) is the
    sampler's, which samples in float32: that metric agrees to float32 rounding."""
    results = []
    for skip in (True, False):
        cfg = make_config(tiny_model_dir, reward_funcs=["my_rewards.constant_for_c"], torch_dtype="float64",
                          per_device_train_batch_size=8, gradient_accumulation_steps=2, loss_type=loss_type,
                          num_iterations=num_iterations, output_dir=f"run{skip}", share_prompt_forward=False)
        trainer = Trainer(cfg)
        trainer.updater._skip_silent_rows = skip
        batch, _ = _generation(trainer)
        silent = torch.cat([mb.advantages == 0 for mb in batch])
        assert 0 < int(silent.sum()) < len(silent)  # both kinds of row in the window
        steps = [trainer.updater.update(batch) for _ in range(num_iterations)]
        for mb in batch:
            mb.advantages = torch.zeros_like(mb.advantages)
            mb.sampler_entropy = None  # the batch again after a step (not a trainer flow): the sampler's is stale
        steps.append(trainer.updater.update(batch))
        results.append((_state(trainer), steps))
    (state_a, steps_a), (state_b, steps_b) = results
    assert steps_a[0]["grad_norm"] > 0 and steps_a[-1]["grad_norm"] == steps_b[-1]["grad_norm"] == 0
    for m_a, m_b in zip(steps_a, steps_b, strict=True):
        assert m_a.keys() == m_b.keys()
        for key in m_a:
            rel = 1e-7 if key == "entropy" and num_iterations == 1 else 1e-10
            assert m_a[key] == pytest.approx(m_b[key], rel=rel, abs=1e-12), key
    for name in state_a:
        torch.testing.assert_close(state_a[name], state_b[name], rtol=1e-10, atol=1e-12, msg=name)
    assert any(not torch.equal(state_a[n], s) for n, s in _state(Trainer(make_config(
        tiny_model_dir, torch_dtype="float64", output_dir="fresh"))).items())  # the steps moved the weights


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_silent_rows_take_their_entropy_from_the_sampler_without_a_forward_pass(workdir, tiny_model_dir,
                                                                              num_iterations):
    """Every group silent (one constant reward). With one pass the update runs no forward pass at all: its entropy
    metric is the sampler's, equal to the forward's within float32 rounding. With two passes the policy moves before
    the second, so the sampler is not asked and the forward computes it."""
    (workdir / "flat.py").write_text("def flat(completions, **kwargs):\n    return [0.5] * len(completions)\n")
    trainer = Trainer(make_config(tiny_model_dir, reward_funcs=["flat.flat"], num_iterations=num_iterations,
                                  per_device_train_batch_size=4, gradient_accumulation_steps=2))
    batch, _ = _generation(trainer)
    assert all(not mb.advantages.any() for mb in batch)
    of = trainer.logprobs.of
    with torch.no_grad():
        tokens = sum(int(mb.completion_mask.sum()) for mb in batch)
        want = sum(float((of(trainer.policy, mb)[1] * mb.completion_mask).sum()) for mb in batch) / tokens
    calls = []
    trainer.logprobs.of = lambda model, mb: calls.append(len(mb.advantages)) or of(model, mb)
    metrics = trainer.updater.update(batch)
    if num_iterations == 1:
        assert trainer.updater.uses_sampler_entropy and all(mb.sampler_entropy is not None for mb in batch)
        assert calls == []
        assert metrics["entropy"] == pytest.approx(want, rel=1e-5)
    else:
        assert not trainer.updater.uses_sampler_entropy and all(mb.sampler_entropy is None for mb in batch)
        assert calls == [4, 4]
        assert metrics["entropy"] == pytest.approx(want, rel=1e-6)
    assert metrics["grad_norm"] == 0


def test_ratio_is_one_on_first_pass_and_moves_on_the_second(workdir, tiny_model_dir):
    trainer = Trainer(make_config(tiny_model_dir, num_iterations=2, learning_rate=5e-2, max_steps=2))
    batch, _ = _generation(trainer)
    assert all(mb.old_logps is not None for mb in batch)  # computed once per generation
    first = trainer.updater.update(batch)
    second = trainer.updater.update(batch)
    assert first["clip_ratio/region_mean"] == 0.0
    assert second["clip_ratio/region_mean"] > 0.0


def test_steps_per_generation_gives_several_optimizer_steps_per_generation(workdir, tiny_model_dir):
    cfg = make_config(tiny_model_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                      steps_per_generation=4, max_steps=4)
    assert cfg.prompts_per_generation == 4 and cfg.micro_batches_per_generation == 4
    trainer = Trainer(cfg)
    calls = []
    original = trainer.collector.sample_groups
    trainer.collector.sample_groups = lambda state, n: calls.append(n) or original(state, n)
    trainer.train()
    assert calls == [4, 4]  # 4 optimizer steps, 2 per generation
    lines = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]


def test_mask_truncated_completions_leaves_cut_off_rows_out(workdir, tiny_model_dir):
    trainer = Trainer(make_config(tiny_model_dir, mask_truncated_completions=True, per_device_train_batch_size=4))
    generation = Generation(prompts=["p"] * 4, completions=["c"] * 4, prompt_ids=[[5, 6]] * 4,
                            completion_ids=[[7, 8, 1], [7, 8, 9], [7, 1], [7]],
                            finish_reasons=["stop", "length", "stop", "length"], rewards=torch.zeros(4, 1),
                            sampler_entropies=[None] * 4)
    (mb,) = trainer.micro_batches(generation, torch.ones(4))
    assert mb.completion_mask.sum(dim=1).tolist() == [3, 0, 2, 0]


def test_dynamic_sampling_keeps_only_groups_with_spread_and_fills_the_batch(workdir, tiny_model_dir):
    cfg = make_config(tiny_model_dir, reward_funcs=["my_rewards.constant_for_c"], dynamic_sampling=True,
                      max_resample_rounds=8, per_device_train_batch_size=8, gradient_accumulation_steps=2)
    trainer = Trainer(cfg)
    batch, metrics = _generation(trainer)
    texts = [trainer.tokenizer.decode(row) for mb in batch for row in mb.input_ids]
    assert len(texts) == cfg.generation_batch_size == 16
    assert all("V: what is" in t and "C: what is" not in t for t in texts)
    assert metrics["dynamic_sampling/dropped_groups"] > 0 and metrics["dynamic_sampling/zero_spread_groups_kept"] == 0
    assert all((mb.advantages != 0).any() for mb in batch)


def test_dynamic_sampling_tops_up_when_rounds_run_out(workdir, tiny_model_dir, caplog):
    cfg = make_config(tiny_model_dir, reward_funcs=["my_rewards.constant_for_c"], dynamic_sampling=True,
                      max_resample_rounds=0, per_device_train_batch_size=16)
    trainer = Trainer(cfg)
    batch, metrics = _generation(trainer)
    assert sum(len(mb.advantages) for mb in batch) == 16  # still full
    assert metrics["dynamic_sampling/zero_spread_groups_kept"] > 0  # seed 3 draws C prompts in the first round
    assert metrics["dynamic_sampling/rounds"] == 0
    assert "zero reward spread after 0 refill round(s)" in caplog.text


def test_dynamic_sampling_refills_at_most_max_resample_rounds_and_counts_what_it_regenerated(workdir, tiny_model_dir,
                                                                                            caplog):
    """Every group has zero spread (one constant reward): the refill runs exactly max_resample_rounds rounds of
    the groups still missing, each of them dropped, and the metrics count them."""
    (workdir / "flat.py").write_text("def flat(completions, **kwargs):\n    return [0.5] * len(completions)\n")
    cfg = make_config(tiny_model_dir, reward_funcs=["flat.flat"], dynamic_sampling=True, max_resample_rounds=2,
                      per_device_train_batch_size=8)
    trainer = Trainer(cfg)
    batch, metrics = _generation(trainer)
    need = cfg.generation_batch_size // cfg.num_generations  # groups per generation
    assert sum(len(mb.advantages) for mb in batch) == cfg.generation_batch_size
    assert metrics["dynamic_sampling/rounds"] == 2
    assert metrics["dynamic_sampling/regenerated_groups"] == 2 * need  # the bound: need x max_resample_rounds
    assert metrics["dynamic_sampling/dropped_groups"] == 3 * need  # the first draw and both refills
    assert metrics["dynamic_sampling/zero_spread_groups_kept"] == need
    assert "zero reward spread after 2 refill round(s)" in caplog.text


def test_dynamic_sampling_oversample_draws_more_prompts_in_one_generation_and_keeps_those_with_spread(workdir,
                                                                                                    tiny_model_dir):
    """Four times the batch's prompts in the first draw (half of them kind C, zero spread): one generation, no
    refill round, only V groups trained on, and the metrics count the extra groups and the surplus dropped."""
    cfg = make_config(tiny_model_dir, reward_funcs=["my_rewards.constant_for_c"], dynamic_sampling=True,
                      dynamic_sampling_oversample=4, max_resample_rounds=0, per_device_train_batch_size=16)
    trainer = Trainer(cfg)
    batch, metrics = _generation(trainer)
    need = cfg.prompts_per_generation
    texts = [trainer.tokenizer.decode(row) for mb in batch for row in mb.input_ids]
    assert len(texts) == cfg.generation_batch_size
    assert all("V: what is" in t and "C: what is" not in t for t in texts)
    assert metrics["dynamic_sampling/rounds"] == 0 and metrics["dynamic_sampling/zero_spread_groups_kept"] == 0
    assert metrics["dynamic_sampling/oversampled_groups"] == 3 * need
    kept_with_spread = 4 * need - metrics["dynamic_sampling/dropped_groups"]
    assert kept_with_spread >= need and metrics["dynamic_sampling/surplus_groups"] == kept_with_spread - need
    assert trainer.state.generations == 1 and metrics["frac_reward_zero_std"] == pytest.approx(
        metrics["dynamic_sampling/dropped_groups"] / (4 * need))  # every group sampled is counted


def test_on_collapse_adapt_with_no_room_to_raise_the_temperature_is_refused(tiny_model_dir):
    with pytest.raises(ConfigError, match="adapt_max_temperature = 0.9 is not above temperature = 1.0"):
        make_config(tiny_model_dir, on_collapse="adapt", temperature=1.0, adapt_max_temperature=0.9)
    assert make_config(tiny_model_dir, on_collapse="adapt", temperature=1.0).adapt_max_temperature == 1.2


def test_dynamic_sampling_oversample_without_dynamic_sampling_is_refused(tiny_model_dir):
    with pytest.raises(ConfigError, match="dynamic_sampling_oversample = 2.0 has no effect without dynamic_sampling"):
        make_config(tiny_model_dir, dynamic_sampling_oversample=2)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_each_loss_type_learns_a_trivial_reward_through_the_cli(workdir, tiny_model_dir, loss_type):
    config = {"model": str(tiny_model_dir), "dataset": "train.jsonl", "output_dir": "run", "device": "cpu",
              "reward_funcs": ["my_rewards.digit_fraction"], "num_generations": 8, "per_device_train_batch_size": 16,
              "max_completion_length": 8, "learning_rate": 3e-2, "max_steps": 16, "seed": 0, "loss_type": loss_type,
              "importance_sampling_level": "sequence" if loss_type == "grpo" else "token"}
    (workdir / "cfg.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("train", "cfg.yaml", cwd=workdir)
    assert result.returncode == 0, result.stderr
    rewards = [json.loads(line)["reward"] for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.1, rewards


def test_options_reach_the_loss(workdir, tiny_model_dir):
    trainer = Trainer(make_config(tiny_model_dir, importance_sampling_level="sequence", delta=1.5, epsilon_high=0.28,
                                  top_entropy_quantile=0.5, reward_combination="normalize_then_sum"))
    s = trainer.loss_settings
    settings = (s.importance_sampling_level, s.delta, s.epsilon_high, s.top_entropy_quantile)
    assert settings == ("sequence", 1.5, 0.28, 0.5)
    batch, _ = _generation(trainer)
    assert trainer.updater.update(batch)["grad_norm"] > 0


def test_beta_zero_loads_no_reference_and_runs_no_reference_forward(workdir, tiny_model_dir):
    trainer = Trainer(make_config(tiny_model_dir, beta=0.0))
    assert trainer.reference is None
    batch, _ = _generation(trainer)
    assert all(mb.ref_logps is None for mb in batch)


def test_lora_trains_only_adapters_and_its_reference_is_the_base_model(workdir, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from grpokit.models.logprobs import completion_logps

    trainer = Trainer(make_config(tiny_model_dir, use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, beta=0.1,
                                  learning_rate=5e-2))
    assert trainer.reference is None  # no second copy: adapters are switched off instead
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    batch, _ = _generation(trainer)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for mb in batch:
        with torch.no_grad():
            want, _ = completion_logps(base, mb.input_ids, mb.attention_mask, mb.completion_mask.shape[1])
        torch.testing.assert_close(mb.ref_logps, want, rtol=1e-5, atol=1e-6)
    trainer.updater.update(batch)
    trainer.updater.update(batch)  # LoRA starts with B = 0, so A's gradient is zero until B has moved once
    for name, p in trainer.policy.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == ("lora_" in name), name
    # after the update the adapters matter, but switching them off still gives the base model
    with torch.no_grad(), trainer.policy.disable_adapter():
        off, _ = completion_logps(trainer.policy, batch[0].input_ids, batch[0].attention_mask,
                                  batch[0].completion_mask.shape[1])
        want, _ = completion_logps(base, batch[0].input_ids, batch[0].attention_mask, batch[0].completion_mask.shape[1])
    torch.testing.assert_close(off, want, rtol=1e-5, atol=1e-6)


def test_lora_run_saves_a_loadable_adapter(workdir, tiny_model_dir):
    from peft import AutoPeftModelForCausalLM

    Trainer(make_config(tiny_model_dir, use_peft=True, lora_r=4, max_steps=1)).train()
    model = AutoPeftModelForCausalLM.from_pretrained(workdir / "run" / "final_model")
    assert (workdir / "run" / "final_model" / "adapter_config.json").is_file()
    assert model(torch.tensor([[5, 6, 7]])).logits.isfinite().all()


def test_sampling_settings_reach_the_sampler(workdir, tiny_model_dir):
    """stop_strings end training rollouts and evaluation completions; min_p / repetition_penalty are passed on."""
    cfg = make_config(tiny_model_dir, stop_strings=["e", "7"], min_p=0.05, repetition_penalty=1.3, temperature=1.5,
                      max_completion_length=24)
    trainer = Trainer(cfg)
    seen = []
    real_generate = trainer.engine.generate
    trainer.engine.generate = lambda ids, n, params: seen.append(params) or real_generate(ids, n, params)
    generation = trainer.collector.sample_groups(trainer.state, 2)
    params = seen[0]
    assert (params.min_p, params.repetition_penalty, params.stop, params.temperature) == (0.05, 1.3, ["e", "7"], 1.5)
    texts = [trainer.tokenizer.decode(c, skip_special_tokens=True) for c in generation.completion_ids]
    for text, reason in zip(texts, generation.finish_reasons, strict=True):
        hit = [i for i, ch in enumerate(text) if ch in "e7"]
        if hit:  # the completion ends at its first stop string
            assert reason == "stop" and hit[0] == len(text) - 1, (text, reason)
    assert any(t and t[-1] in "e7" for t in texts), f"no completion met a stop string: {texts}"


def test_bf16_auto_on_a_gpu_is_asked_only_after_the_reward_workers_fork(workdir, tiny_model_dir, monkeypatch):
    """Asking a GPU whether it computes bf16 starts CUDA in the trainer's process; its reward workers fork before
    that, so that a reward using CUDA in a worker still can. The run is on the CPU, told it is on a GPU."""
    from grpokit import runtime
    from grpokit.config.schema import GRPOConfig
    from grpokit.train import trainer as trainer_mod

    events = []
    real_runner, real_ask = trainer_mod.RewardRunner, runtime.bf16_unsupported
    monkeypatch.setattr(trainer_mod, "RewardRunner", lambda *a, **k: events.append("fork") or real_runner(*a, **k))
    monkeypatch.setattr(runtime, "bf16_unsupported", lambda device: events.append("ask") or real_ask(device))
    monkeypatch.setattr(GRPOConfig, "_on_cuda", lambda self: True)
    trainer = Trainer(make_config(tiny_model_dir, bf16="auto"))
    assert events == ["fork", "ask"]
    assert trainer.cfg.bf16 is (real_ask("cpu") is None) and set(trainer.cfg.settled_from_auto) == {"bf16"}
    trainer.rewards.close()
