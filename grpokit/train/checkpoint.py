"""Checkpoints: everything a run needs to go on exactly where it stopped.

    OUTPUT_DIR/checkpoint-N/
      model.safetensors, config.json      full fine-tune (loadable with from_pretrained)
      adapter_model.safetensors, ...      or, with LoRA, the adapter (loadable with peft)
      tokenizer files
      optimizer.pt, scheduler.pt
      rng_state.pt                        Python, NumPy, torch (CPU and CUDA) and the data order's RNG
      pending.pt                          the part of the current generation not yet trained on
      trainer_state.json                  step, data position, sampler counter, eval before training, best model so far,
                                          the health monitor's windows, the reward functions' failure counts
                                          (`grpokit sft`'s: "kind": "sft", step, data order, losses, token count)
      config.yaml                         the resolved config

A checkpoint is written under a temporary name (`.checkpoint-N.tmp`) and renamed when complete,
so a process killed mid-write leaves the previous checkpoint as it was; a leftover temporary
directory is ignored and removed by the next save. The remaining micro-batches of a generation
are saved with it (TRL regenerates them on resume, which changes the run): `N` steps, resume,
`N` more equal `2N` steps.

`save_train` / `restore_train` write and read a GRPO run's checkpoint from the explicit parts: the loop's
`TrainState` (state.py), the model, tokenizer, optimizer and scheduler, the state() of the best-model keeper,
the health monitor and the reward runner, and the process group.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from grpokit.algo.batches import MicroBatch, Pending
from grpokit.config import GRPOConfig, resume_neutral_keys
from grpokit.errors import ConfigError
from grpokit.runtime.distributed import Processes
from grpokit.train.state import TrainState

_NAME = re.compile(r"^checkpoint-(\d+)$")
log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint


@dataclass(slots=True, kw_only=True)
class Saved:
    """What `load` reads back (`restore_train`, and sft.py, put each part where it belongs)."""

    path: Path
    state: dict[str, Any]
    config: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    pending: dict[str, Any] | None


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find(output_dir: Path, resume: str | bool, kind: str = "grpo") -> Path:
    """The checkpoint `--resume` names: the newest in `output_dir` (True), or a path; one written by a run of `kind`
    ("grpo": `grpokit train`, "sft": `grpokit sft`). Cheap: the CLI calls it before anything loads."""
    if resume is True or resume == "latest":
        found = checkpoints(output_dir)
        if not found:
            raise ConfigError(f"--resume: no checkpoint in {output_dir} (runs write checkpoint-N every save_steps); "
                              "start without --resume, or give --resume PATH")
        path = found[-1]
    else:
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise ConfigError(f"--resume {path}: not a complete grpokit checkpoint (no {STATE_FILE}); "
                              f"complete ones in {output_dir}: {[p.name for p in checkpoints(output_dir)] or 'none'}")
    try:
        written_by = json.loads((path / STATE_FILE).read_text()).get("kind", "grpo")
    except (ValueError, AttributeError):
        written_by = kind  # a damaged state file: `load` says what is wrong with it
    if written_by != kind:
        ours, theirs = ("sft", "train") if kind == "sft" else ("train", "sft")
        raise ConfigError(f"--resume {path}: a `grpokit {theirs}` checkpoint, not a `grpokit {ours}` one; go on "
                          f"with it with `grpokit {theirs} CONFIG --resume {path}`"
                          + (", or start GRPO from an SFT run's final_model (--sft-model)" if kind == "grpo" else ""))
    return path


def save(output_dir: Path, step: int, *, policy, tokenizer, optimizer, scheduler, state: dict[str, Any],
         rng: dict[str, Any], pending: dict[str, Any] | None, config_yaml: str, keep: int | None) -> Path:
    """Write checkpoint-`step` atomically (temporary directory, then rename); keep the newest `keep`."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    for stale in output_dir.glob(".checkpoint-*.tmp"):  # left by a process killed mid-write
        shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    policy.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng, tmp / "rng_state.pt")
    if pending is not None:
        torch.save(pending, tmp / "pending.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    if final.exists():  # the same step written again (a resumed run): swap, then drop the old one
        old = output_dir / f".checkpoint-{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    if keep is not None:
        for stale in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(stale)
    return final


def _read(path: Path, name: str, how):
    """`how(path / name)`; None where the file is absent; a ConfigError naming it where it cannot be read."""
    file = path / name
    if not file.is_file():
        return None
    try:
        return how(file)
    except Exception as exc:  # a damaged or foreign file: say which, not a traceback
        raise ConfigError(f"--resume {path}: cannot read {name} ({type(exc).__name__}: {exc}); resume from "
                          "an earlier checkpoint") from None


def saved_config(path: Path) -> dict[str, Any]:
    """The config a checkpoint's run had (its config.yaml; {} where absent). Model-free."""
    config = _read(path, "config.yaml", lambda f: yaml.safe_load(f.read_text()))
    return config if isinstance(config, dict) else {}


def load(path: Path) -> Saved:
    def tensors(file: Path):
        return torch.load(file, map_location="cpu", weights_only=True)

    return Saved(path=path, state=_read(path, STATE_FILE, lambda f: json.loads(f.read_text())),
                 config=saved_config(path), optimizer=_read(path, "optimizer.pt", tensors),
                 scheduler=_read(path, "scheduler.pt", tensors), rng=_read(path, "rng_state.pt", tensors),
                 pending=_read(path, "pending.pt", tensors))


def check_config(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Resuming under settings that change the results is an error (the CLI's --force skips this check)."""
    neutral = set(resume_neutral_keys())  # the schema marks the settings that change what a run logs, not computes
    if saved.get("lr_scheduler_type") == current.get("lr_scheduler_type") == "constant":
        neutral.add("max_steps")  # a constant schedule does not depend on the run's length: training longer is fine
    fields = GRPOConfig.model_fields  # a setting newer than the checkpoint was at its default when it was written
    saved = {**{key: fields[key].default for key in current if key not in saved and key in fields}, **saved}
    changed = [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in sorted(set(saved) | set(current))
               if key not in neutral and saved.get(key) != current.get(key)]
    if changed:
        raise ConfigError(f"resuming {path} with settings that change the results: {'; '.join(changed)}. Restore "
                          "them, or pass --force to resume anyway (the run is then no longer the one it would "
                          "have been)")


def load_weights(policy, path: Path, uses_adapters: bool) -> None:
    """Put a checkpoint's weights (full model or LoRA adapter) into the live policy module."""
    from safetensors.torch import load_file

    if uses_adapters:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(policy, load_file(path / "adapter_model.safetensors"))
        if result.unexpected_keys:
            raise ConfigError(f"{path}: the adapter does not fit this model (unexpected {result.unexpected_keys[:3]})")
        return
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("model*.safetensors")):
        weights.update(load_file(file))
    result = policy.load_state_dict(weights, strict=False)
    loaded = {p.data_ptr() for name, p in policy.state_dict().items() if name in weights}
    missing = [k for k in result.missing_keys if policy.state_dict()[k].data_ptr() not in loaded]  # tied ones are fine
    if missing or result.unexpected_keys:
        raise ConfigError(f"{path}: the weights do not fit this model (missing {missing[:3]}, "
                          f"unexpected {result.unexpected_keys[:3]}); resume with the model the run started from")


def rng_state(order_rng: random.Random) -> dict[str, Any]:
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "order": order_rng.getstate()}


def set_rng_state(state: dict[str, Any], order_rng: random.Random) -> None:
    import numpy as np

    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    order_rng.setstate(_tuples(state["order"]))


def _tuples(value):
    """random.setstate wants the nested tuples getstate gave; a round trip may turn them into lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass(slots=True, kw_only=True)
class Restored:
    """What `restore_train` read besides what it put into the model, optimizer and scheduler: the loop's state, and
    the state() of each part that keeps its own (None: absent, in checkpoints written before the part kept one)."""

    state: TrainState
    best_model: dict[str, Any] | None
    health: dict[str, Any] | None
    rewards: dict[str, Any] | None  # this process's reward runner's


def save_train(output_dir: Path, state: TrainState, *, policy, tokenizer, optimizer, scheduler,
               best_model: dict[str, Any], health: dict[str, Any], rewards: dict[str, Any], procs: Processes,
               config_yaml: str, keep: int | None) -> Path:
    """Checkpoint a GRPO run at `state.global_step`; `best_model`, `health`, `rewards`: those parts' state().
    With several processes every one calls this (each holds its own unused micro-batches and reward counts,
    gathered here); the main process writes."""
    pending = None
    if state.pending:
        mine = [{f: _to_cpu(getattr(mb, f)) for f in MicroBatch.__slots__} for mb in state.pending.micro_batches]
        pending = {"windows": state.pending.windows, "metrics": state.pending.metrics, "micro_batches": mine}
        if procs.count > 1:
            pending["micro_batches"] = procs.gather(mine)  # one list per process
    if procs.count > 1:  # each process's runner counts the completions it scored
        rewards = procs.gather(rewards)
    saved = {"global_step": state.global_step, "generations": state.generations, "num_tokens": state.num_tokens,
             "order": state.order, "consecutive_skips": state.consecutive_skips, "eval_before": state.eval_before,
             "train_seconds": state.train_seconds, "trackers": state.trackers, "temperature": state.temperature,
             "temperature_raised_at": state.temperature_raised_at, "best_model": best_model,
             "processes": procs.count,
             "health": health, "rewards": rewards}
    path = output_dir / f"checkpoint-{state.global_step}"
    if procs.is_main:
        path = save(output_dir, state.global_step, policy=policy, tokenizer=tokenizer, optimizer=optimizer,
                    scheduler=scheduler, state=saved, rng=rng_state(state.order_rng), pending=pending,
                    config_yaml=config_yaml, keep=keep)
    procs.wait()  # nobody reads or moves on before the checkpoint is complete
    return path


def restore_train(path: Path, *, config: dict[str, Any], force: bool, policy, uses_adapters: bool, optimizer,
                  scheduler, procs: Processes, device) -> Restored:
    """Read the GRPO checkpoint `path` for a run built from `config` (its model_dump): its weights, optimizer and
    scheduler state go into the given ones, the RNGs are set; the rest is returned. Refused (unless `force`) when
    the config changed in a way that changes the results, or the process count differs."""
    saved = load(path)
    written = saved.state
    processes, count = written.get("processes", 1), procs.count
    if not force:
        check_config(saved.config, config, path)
        if processes != count:
            raise ConfigError(f"--resume {path}: written by a run of {processes} process(es), this one has {count}: "
                              "each optimizer step would train on a different number of completions "
                              f"(per_device_train_batch_size x processes). Resume with {processes} process(es), or "
                              f"pass --force to go on with {count}")
    load_weights(policy, path, uses_adapters)
    optimizer.load_state_dict(saved.optimizer)
    scheduler.load_state_dict(saved.scheduler)
    state = TrainState(order_rng=random.Random(), global_step=written["global_step"],
                       generations=written["generations"], num_tokens=written["num_tokens"], order=written["order"],
                       consecutive_skips=written["consecutive_skips"], eval_before=written["eval_before"],
                       train_seconds=written.get("train_seconds", 0.0),  # absent in checkpoints before the budget
                       trackers=dict(written.get("trackers") or {}),  # absent before trackers resumed
                       temperature=written.get("temperature"),  # these two absent before on_collapse adapt
                       temperature_raised_at=written.get("temperature_raised_at"))
    set_rng_state(saved.rng, state.order_rng)
    rewards = written.get("rewards")
    if isinstance(rewards, list):  # one per process
        rewards = rewards[procs.index] if len(rewards) == count else None  # --force with another count: fresh
    restored = Restored(state=state, best_model=written.get("best_model"), health=written.get("health"),
                        rewards=rewards)
    if saved.pending is None:
        return restored
    if processes != count:  # --force: the rest of that generation was cut for another process count
        log.warning("--force: the %d unused optimizer step(s) of the generation in %s were cut for %d process(es); "
                    "they are dropped and the run goes on with a new generation", len(saved.pending["windows"]), path,
                    processes)
        return restored
    mine = saved.pending["micro_batches"]
    if count > 1:
        mine = mine[procs.index]
    state.pending = Pending(windows=saved.pending["windows"], metrics=saved.pending["metrics"],
                            micro_batches=[MicroBatch(**{k: _to(v, device) for k, v in mb.items()}) for mb in mine])
    return restored


def _to_cpu(value):
    return value.cpu() if isinstance(value, torch.Tensor) else value


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value
