"""checkpoint.save_train / restore_train on a torch.nn.Linear and its optimizer: the records round-trip, the
on-disk format is the one older checkpoints have, writes are atomic, save_total_limit keeps the newest."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from grpokit.algo.batches import MicroBatch, Pending
from grpokit.config import validate_config
from grpokit.errors import ConfigError
from grpokit.runtime.distributed import Processes
from grpokit.train import checkpoint
from grpokit.train.state import TrainState

STATE_KEYS = ["global_step", "generations", "num_tokens", "order", "consecutive_skips", "eval_before", "train_seconds",
              "trackers", "temperature", "temperature_raised_at", "best_model", "processes", "health",
              "rewards"]  # trainer_state.json (train_seconds: since the budget; trackers: since a resume continues
# the tracker runs; temperature, temperature_raised_at: since on_collapse adapt)


class _Policy(torch.nn.Linear):
    def save_pretrained(self, path: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path / "model.safetensors")


class _Tokenizer:
    def save_pretrained(self, path: Path) -> None:
        (path / "tokenizer.json").write_text("{}")


class _TwoProcesses:
    """Process `index` of two, as save/restore see it: gather returns [process 0's value, process 1's value]."""

    count = 2

    def __init__(self, index: int, other):
        self.index, self.other = index, other

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def gather(self, value) -> list:
        return [value, self.other(value)] if self.index == 0 else [self.other(value), value]

    def wait(self) -> None:
        pass


def _cfg(tmp_path, **overrides):
    return validate_config({"output_dir": str(tmp_path), "learning_rate": 1e-2, "save_steps": None, **overrides})


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    policy = _Policy(3, 2)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 10)
    return policy, optimizer, scheduler


def _train_once(policy, optimizer, scheduler) -> None:
    policy(torch.ones(4, 3)).square().sum().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _micro_batch(value: float) -> MicroBatch:
    return MicroBatch(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                      completion_mask=torch.ones(1, 2), advantages=torch.tensor([value]),
                      old_logps=torch.full((1, 2), -value), step_sequences=4, step_tokens=9)


def _state() -> TrainState:
    state = TrainState.start(seed=7)
    state.next_prompts(3, 10)  # part-way through the first pass over 10 prompts
    state.global_step, state.generations, state.num_tokens, state.consecutive_skips = 5, 3, 1234, 1
    state.eval_before = {"eval/accuracy": 0.25}
    state.train_seconds = 12.5
    state.pending = Pending(micro_batches=[_micro_batch(0.5), _micro_batch(-1.5)], windows=[2],
                            metrics={"reward": 0.75})
    return state


def _save(tmp_path, state, policy, optimizer, scheduler, procs=None, keep=None, **parts) -> Path:
    return checkpoint.save_train(tmp_path, state, policy=policy, tokenizer=_Tokenizer(), optimizer=optimizer,
                                 scheduler=scheduler, best_model=parts.get("best_model", {"best": 1.0}),
                                 health=parts.get("health", {"windows": [1, 2]}),
                                 rewards=parts.get("rewards", {"failures": [0, 2]}),
                                 procs=procs or Processes(cpu=True), config_yaml=_cfg(tmp_path).to_yaml(), keep=keep)


def _restore(tmp_path, path, policy, optimizer, scheduler, procs=None, force=False, **overrides):
    return checkpoint.restore_train(path, config=_cfg(tmp_path, **overrides).model_dump(mode="json"), force=force,
                                    policy=policy, uses_adapters=False, optimizer=optimizer, scheduler=scheduler,
                                    procs=procs or Processes(cpu=True), device=torch.device("cpu"))


def test_the_records_round_trip(tmp_path):
    policy, optimizer, scheduler = _parts()
    _train_once(policy, optimizer, scheduler)
    state = _state()
    path = _save(tmp_path, state, policy, optimizer, scheduler)
    assert path == tmp_path / "checkpoint-5"
    next_torch, next_python, next_order = torch.rand(3), random.random(), state.order_rng.random()

    fresh, fresh_optimizer, fresh_scheduler = _parts(seed=1)  # other weights, no optimizer state yet
    restored = _restore(tmp_path, path, fresh, fresh_optimizer, fresh_scheduler)
    got = restored.state
    assert (got.global_step, got.generations, got.num_tokens, got.consecutive_skips) == (5, 3, 1234, 1)
    assert got.order == state.order and len(got.order) == 7 and got.eval_before == {"eval/accuracy": 0.25}
    assert got.train_seconds == 12.5  # max_train_seconds' budget goes on counting
    # every random stream goes on where it was when the checkpoint was written
    assert torch.equal(torch.rand(3), next_torch) and random.random() == next_python
    assert got.order_rng.random() == next_order
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(), fresh.state_dict().values()))
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    saved_adam, loaded_adam = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert all(torch.equal(saved_adam[i]["exp_avg"], loaded_adam[i]["exp_avg"]) for i in saved_adam)
    assert got.pending.windows == [2] and got.pending.metrics == {"reward": 0.75}
    for a, b in zip(state.pending.micro_batches, got.pending.micro_batches, strict=True):
        for field in MicroBatch.__slots__:
            x, y = getattr(a, field), getattr(b, field)
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, field
    assert (restored.best_model, restored.health, restored.rewards) == ({"best": 1.0}, {"windows": [1, 2]},
                                                                        {"failures": [0, 2]})


def test_a_checkpoint_from_before_the_budget_restores_with_no_training_time_spent(tmp_path):
    policy, optimizer, scheduler = _parts()
    path = _save(tmp_path, _state(), policy, optimizer, scheduler)
    written = json.loads((path / "trainer_state.json").read_text())
    del written["train_seconds"]
    (path / "trainer_state.json").write_text(json.dumps(written))
    assert _restore(tmp_path, path, *_parts()).state.train_seconds == 0.0


def test_the_files_are_those_older_checkpoints_have(tmp_path):
    policy, optimizer, scheduler = _parts()
    state = _state()
    path = _save(tmp_path, state, policy, optimizer, scheduler)
    assert {p.name for p in path.iterdir()} == {"model.safetensors", "tokenizer.json", "optimizer.pt", "scheduler.pt",
                                                "rng_state.pt", "pending.pt", "config.yaml", "trainer_state.json"}
    written = json.loads((path / "trainer_state.json").read_text())
    assert list(written) == STATE_KEYS and written["processes"] == 1 and written["order"] == state.order
    rng = torch.load(path / "rng_state.pt", weights_only=False)
    assert set(rng) == {"python", "numpy", "torch", "cuda", "order"}
    pending = torch.load(path / "pending.pt", weights_only=True)
    assert set(pending) == {"windows", "metrics", "micro_batches"}
    assert set(pending["micro_batches"][0]) == set(MicroBatch.__slots__)
    state.pending = None
    assert not (_save(tmp_path, state, policy, optimizer, scheduler) / "pending.pt").exists()
    assert _restore(tmp_path, path, *_parts()).state.pending is None


def test_a_checkpoint_is_written_under_a_temporary_name_and_renamed(tmp_path):
    policy, optimizer, scheduler = _parts()
    left = tmp_path / ".checkpoint-3.tmp"  # a process killed mid-write left this
    left.mkdir()
    (tmp_path / "checkpoint-4").mkdir()  # and this, without its state file: not a checkpoint
    assert checkpoint.checkpoints(tmp_path) == []
    state = _state()
    path = _save(tmp_path, state, policy, optimizer, scheduler)
    assert not left.exists() and not list(tmp_path.glob(".checkpoint-*"))
    assert checkpoint.checkpoints(tmp_path) == [path]
    state.num_tokens = 99  # the same step written again (a resumed run) replaces the old one
    _save(tmp_path, state, policy, optimizer, scheduler)
    assert json.loads((path / "trainer_state.json").read_text())["num_tokens"] == 99
    assert not list(tmp_path.glob(".checkpoint-*"))


def test_save_total_limit_keeps_the_newest(tmp_path):
    policy, optimizer, scheduler = _parts()
    state = TrainState.start(seed=0)
    for step in (1, 2, 3, 4):
        state.global_step = step
        _save(tmp_path, state, policy, optimizer, scheduler, keep=2)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    assert checkpoint.find(tmp_path, True) == tmp_path / "checkpoint-4"


def test_a_changed_result_setting_or_process_count_is_refused_unless_forced(tmp_path):
    policy, optimizer, scheduler = _parts()
    path = _save(tmp_path, _state(), policy, optimizer, scheduler)
    with pytest.raises(ConfigError, match="learning_rate: 0.01 -> 0.02"):
        _restore(tmp_path, path, *_parts(), learning_rate=2e-2)
    assert _restore(tmp_path, path, *_parts(), force=True, learning_rate=2e-2).state.global_step == 5
    assert _restore(tmp_path, path, *_parts(), logging_steps=5).state.global_step == 5  # a neutral setting
    two = _TwoProcesses(0, other=lambda value: value)
    with pytest.raises(ConfigError, match="written by a run of 1 process"):
        _restore(tmp_path, path, *_parts(), procs=two)
    forced = _restore(tmp_path, path, *_parts(), procs=two, force=True)
    assert forced.state.pending is None  # that generation was cut for one process: a new one is sampled
    assert forced.rewards == {"failures": [0, 2]}  # a single dict, not one per process


def test_with_two_processes_each_gets_back_its_own_micro_batches_and_reward_counts(tmp_path):
    policy, optimizer, scheduler = _parts()

    def other(value):  # process 1's value of what process 0 gathers: its micro-batches' advantages x 10
        if isinstance(value, list):
            return [{**mb, "advantages": mb["advantages"] * 10} for mb in value]
        return {"failures": [7]}

    path = _save(tmp_path, _state(), policy, optimizer, scheduler, procs=_TwoProcesses(0, other))
    written = json.loads((path / "trainer_state.json").read_text())
    assert written["processes"] == 2 and written["rewards"] == [{"failures": [0, 2]}, {"failures": [7]}]
    for index, scale in ((0, 1), (1, 10)):
        restored = _restore(tmp_path, path, *_parts(), procs=_TwoProcesses(index, other))
        assert [float(mb.advantages) for mb in restored.state.pending.micro_batches] == [0.5 * scale, -1.5 * scale]
        assert restored.rewards == ({"failures": [0, 2]} if index == 0 else {"failures": [7]})


def test_the_optimizer_is_torchs_fused_adamw_and_its_state_loads_into_the_default_one(tiny_model):
    """AdamW runs fused on CPU; its step equals the default implementation's within float32 rounding, and an
    optimizer state saved by a run from before (the default AdamW) loads into it and steps alike."""
    from grpokit.models.loading import optimizer_and_schedule

    model, _ = tiny_model
    cfg = validate_config({"model": "m", "dataset": "d", "learning_rate": 1e-3, "max_steps": 4, "weight_decay": 0.1})
    fused, _ = optimizer_and_schedule(model, cfg)
    assert fused.defaults["fused"] is True
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    default = torch.optim.AdamW([torch.nn.Parameter(s.clone()) for s in start], lr=1e-3, weight_decay=0.1)
    for _ in range(3):
        for p, g, q in zip(params, grads, default.param_groups[0]["params"], strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        default.step()
    for p, q in zip(params, default.param_groups[0]["params"], strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    resumed, _ = optimizer_and_schedule(model, cfg)
    resumed.load_state_dict(default.state_dict())  # the old implementation's state
    for p, g, q in zip(params, grads, default.param_groups[0]["params"], strict=True):
        with torch.no_grad():
            p.copy_(q)
        p.grad, q.grad = g.clone(), g.clone()
    resumed.step()
    default.step()
    for p, q in zip(params, default.param_groups[0]["params"], strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
