"""RunHarness.run, the step loop train and sft share, on fake steps: what ends it, when it saves, and how several
processes agree after each step (one exchange: the signal any got, the first reason, the longest time)."""

import pytest

from grpokit.config import GRPOConfig
from grpokit.train.harness import RunHarness


class _Loop:
    """Fake steps of `seconds` each; records the checkpoints `save` was asked for."""

    def __init__(self, seconds: float = 1.0, stop_at: int | None = None):
        self.position, self.spent, self.saved, self.seconds, self.stop_at = 0, 0.0, [], seconds, stop_at

    def step(self) -> int:
        self.position += 1
        self.spent += self.seconds
        return self.position

    def save(self):
        self.saved.append(self.position)
        return f"checkpoint-{self.position}"

    def stop(self):
        return "collapse" if self.stop_at is not None and self.position >= self.stop_at else None


def _run(loop: _Loop, procs=None, **fields) -> list[str]:
    said = []
    harness = RunHarness(GRPOConfig(**fields), command="train", procs=procs, say=said.append)
    harness.run(step=loop.step, position=lambda: loop.position, save=loop.save, spent=lambda: loop.spent,
                stop=loop.stop)
    return said


def test_max_steps_with_the_save_cadence_and_no_checkpoint_at_the_last_step():
    loop = _Loop()
    _run(loop, max_steps=6, save_steps=2)
    assert (loop.position, loop.saved) == (6, [2, 4])


def test_the_budget_ends_the_run_at_the_first_step_end_after_it_with_a_checkpoint():
    loop = _Loop(seconds=1.5)
    said = _run(loop, max_steps=10, save_steps=4, max_train_seconds=4.0)
    assert loop.position == 3 and loop.saved == [3]  # 4.5 s after step 3
    assert "max_train_seconds 4 reached (4 s of training): the run ends after step 3 of 10" in said[-1]
    loop = _Loop(seconds=1.5)
    _run(loop, max_steps=10, save_steps=None, max_train_seconds=4.0)
    assert (loop.position, loop.saved) == (3, [])  # save_steps None: final_model only, as at max_steps


def test_a_spent_budget_runs_no_step():
    loop = _Loop()
    loop.spent = 5.0
    said = _run(loop, max_steps=10, max_train_seconds=5.0)
    assert loop.position == 0 and "already spent" in said[-1]


def test_a_reason_to_stop_ends_the_run_after_that_step():
    loop = _Loop(stop_at=2)
    said = _run(loop, max_steps=10, save_steps=100)
    assert (loop.position, loop.saved) == (2, [2]) and said[-1] == "collapse: the run ends after step 2 of 10"


class _TwoProcesses:
    """This process and another one whose values after each step are `other`'s."""

    count, is_main = 2, True

    def __init__(self, other):
        self.other = other
        self.exchanges = 0

    def gather(self, mine):
        self.exchanges += 1
        return [mine, self.other]


@pytest.mark.parametrize(("other", "position", "said"), [
    ((None, "collapse elsewhere", 0.0), 1, "collapse elsewhere: the run ends after step 1 of 5"),
    ((None, None, 99.0), 1, "max_train_seconds 10 reached (99 s of training)"),
])
def test_processes_stop_on_another_process_s_reason_or_time_in_one_exchange_a_step(other, position, said):
    loop, procs = _Loop(), _TwoProcesses(other)
    lines = _run(loop, procs=procs, max_steps=5, save_steps=100, max_train_seconds=10.0)
    assert loop.position == position and said in lines[-1]
    assert procs.exchanges == position  # one gather per step, not one per question


def test_another_process_s_signal_stops_this_one_with_a_checkpoint():
    from grpokit.errors import Interrupted

    loop = _Loop()
    with pytest.raises(Interrupted, match="stopped by SIGTERM after step 1; checkpoint written to checkpoint-1") as e:
        _run(loop, procs=_TwoProcesses((15, None, 0.0)), max_steps=5)
    assert e.value.exit_code == 128 + 15 and loop.saved == [1]


def test_claim_output_dir_refuses_a_run_and_moves_it_aside_whole(tmp_path, monkeypatch):
    from grpokit.errors import ConfigError
    from grpokit.train import harness

    out = tmp_path / "run"
    assert harness.claim_output_dir(out, resume=None, overwrite=False) is None  # nothing there
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a directory of other files holds no run
    assert harness.existing_run(out) is None and harness.claim_output_dir(out, resume=None, overwrite=False) is None
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    for n in (1, 2, 10, 11):
        (out / f"checkpoint-{n}").mkdir()
    (out / "final_model").mkdir()
    assert harness.existing_run(out) == ("2 logged step(s) in metrics.jsonl, 4 checkpoint(s) (checkpoint-2, "
                                         "checkpoint-10, checkpoint-11, ...), final_model")
    with pytest.raises(ConfigError, match=r"output_dir '.*run' holds a run .*grpokit sft cfg.yaml --resume"):
        harness.claim_output_dir(out, resume=None, overwrite=False, command="sft", config_name="cfg.yaml")
    assert harness.claim_output_dir(out, resume=True, overwrite=False) is None  # resuming goes on with it
    assert harness.claim_output_dir(out, resume=None, overwrite=True, main=False) is None  # only the main moves it
    assert out.exists()
    monkeypatch.setattr(harness.time, "strftime", lambda fmt, t: "20261203T000000Z")
    (tmp_path / "run.old-20261203T000000Z").mkdir()  # taken: the next free name
    moved = harness.claim_output_dir(out, resume=None, overwrite=True)
    assert moved == tmp_path / "run.old-20261203T000000Z-2" and not out.exists()
    assert (moved / "notes.txt").read_text() == "mine" and (moved / "checkpoint-11").is_dir()


@pytest.mark.parametrize("kind", ["grpo", "sft"])
@pytest.mark.parametrize("saved", [True, False])
def test_resume_takes_the_checkpoints_bf16_for_a_setting_left_to_auto(tmp_path, monkeypatch, caplog, kind, saved):
    """`bf16: auto` settles per machine; a resumed run keeps what its checkpoint's run settled, whatever this machine
    would choose. SFT's config is checked as SFT's: its 4-row batch is no GRPO group multiple, which an assignment
    that re-validated the config as GRPO's would refuse."""
    import json
    import logging

    import yaml

    import grpokit.runtime as runtime
    from grpokit.config import validate_config
    from grpokit.train.harness import resume_checkpoint

    monkeypatch.setattr(runtime, "bf16_unsupported", lambda device: None if not saved else "no native bf16 here")
    point = tmp_path / "run" / "checkpoint-2"
    point.mkdir(parents=True)
    (point / "trainer_state.json").write_text(json.dumps({"kind": kind, "global_step": 2}))
    (point / "config.yaml").write_text(yaml.safe_dump({"bf16": saved}))
    settings = {"output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 4 if kind == "sft" else 8}
    auto = validate_config(settings, command=kind if kind == "sft" else "train").settle_auto()
    assert auto.bf16 is (not saved)  # this machine's choice, the opposite of the checkpoint's
    with caplog.at_level(logging.INFO):
        assert resume_checkpoint(auto, True, kind=kind) == point
    assert auto.bf16 is saved and auto.model_dump()["bf16"] is saved
    assert f"bf16: auto -> {'on' if saved else 'off'}, as the run in {point} settled it" in caplog.text
    explicit = validate_config({**settings, "bf16": not saved}, command=kind if kind == "sft" else "train")
    resume_checkpoint(explicit.settle_auto(), True, kind=kind)
    assert explicit.bf16 is (not saved)  # set by the user: the config check then refuses the change, as before
    (point / "config.yaml").write_text(yaml.safe_dump({"bf16": "auto"}))  # a foreign value is never taken
    other = validate_config(settings, command=kind if kind == "sft" else "train").settle_auto()
    resume_checkpoint(other, True, kind=kind)
    assert other.bf16 is (not saved)
