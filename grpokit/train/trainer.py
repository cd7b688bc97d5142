"""The GRPO loop: rollout -> rewards -> advantages -> policy update, one optimizer step at a time.

Each generation samples `prompts_per_generation` prompts x `num_generations` completions and scores them
(rollout/collect.py; with `dynamic_sampling` zero-spread groups are refilled). The generation is cut into
`steps_per_generation` micro-batches of `per_device_train_batch_size` completions (algo/batches.py's plan);
every `gradient_accumulation_steps` of them make one optimizer step (train/update.py), and the whole pass
repeats `num_iterations` times. What a checkpoint keeps of the loop is its `TrainState` (train/state.py).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from grpokit.algo.batches import Generation, MicroBatch, Pending
from grpokit.config.schema import GRPOConfig
from grpokit.data import loading as data_mod
from grpokit.evaluation.evaluate import eval_sampling, evaluate_per_prompt, merge_results
from grpokit.evaluation.preflight import early_checks
from grpokit.models import loading as models
from grpokit.models.logprobs import CompletionLogProbs
from grpokit.observe import alerts, runlog
from grpokit.observe.alerts import HealthMonitor
from grpokit.observe.metrics import MetricsLogger, Timers
from grpokit.rewards import RewardFunction, RewardRunner
from grpokit.rollout.collect import Collector
from grpokit.rollout.torch_engine import TorchEngine
from grpokit.rollout.vllm_engine import make_engine
from grpokit.runtime import run_device
from grpokit.runtime.distributed import Processes, share
from grpokit.runtime.distributed import rank as process_rank
from grpokit.train import checkpoint
from grpokit.train.best_model import BestModel
from grpokit.train.harness import RunHarness, claim_output_dir, resume_checkpoint
from grpokit.train.state import TrainState
from grpokit.train.update import LogProbs, Updater, count_skip, loss_settings, prepare_micro_batches, skip_limit_error

log = logging.getLogger(__name__)


@dataclass(slots=True, kw_only=True)
class TrainResult:
    output_dir: Path
    steps: int
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None


class Trainer:
    """The loop. Everything is built from `cfg`, except what the Python API hands in already made:
    records (lists of dicts), a model object and its tokenizer, reward callables, a peft config."""

    def __init__(self, cfg: GRPOConfig, *, train_records: list[dict] | None = None,
                 eval_records: list[dict] | None = None, model=None, tokenizer=None, reward_funcs: list | None = None,
                 peft_config=None):
        self.cfg = cfg
        self.device = torch.device(run_device(cfg.device))
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        if tokenizer is None and model is None and cfg.transform is not None:  # the transform gets the run's own
            tokenizer = models.transform_tokenizer(cfg)
        # data, rewards and every setting checked without a model first: their errors come before the (slow) load
        inputs = early_checks(cfg, train_records=train_records, eval_records=eval_records, reward_funcs=reward_funcs,
                              settle_cuda=False,  # asking a GPU starts CUDA, which the workers' fork must precede
                              check_model=model is None,  # a model object given: cfg.model only names it
                              tokenizer=tokenizer, check_prompts=model is None or tokenizer is not None)
        self.cfg = cfg = inputs.cfg
        self.reward_funcs: list[RewardFunction] = inputs.reward_funcs
        self.train_records, self.eval_records = inputs.train_records, inputs.eval_records
        self.validation_records = inputs.validation_records
        self.best = BestModel(cfg)
        # reward workers fork now, while this process is small and before the process group starts (runner.py)
        errors_file = "reward_errors.jsonl" if process_rank() == 0 else f"reward_errors.rank{process_rank()}.jsonl"
        self.rewards = RewardRunner(self.reward_funcs, timeout=cfg.reward_timeout,
                                    error_rate_limit=cfg.reward_error_rate_limit,
                                    error_log=Path(cfg.output_dir) / errors_file)
        cfg.settle_auto()  # bf16: auto on a CUDA GPU, now that the reward workers have forked
        self.procs = Processes(cpu=self.device.type == "cpu")  # several under accelerate launch / torchrun
        if self.procs.count > 1:
            self.device = self.procs.device
            if not self.procs.is_main:  # one process speaks for the job; warnings still come from every one
                logging.getLogger("grpokit").setLevel(logging.WARNING)
        model_path = models.resolve_model_path(cfg.model) if model is None or tokenizer is None else None
        self.tokenizer = (models.prepare_tokenizer(tokenizer) if tokenizer is not None
                          else models.load_tokenizer(model_path))
        if model is None:
            model = models.load_policy(model_path, getattr(torch, cfg.torch_dtype),
                                       quantization=models.bnb_4bit_kwargs(cfg), device=self.device)
        trainable = models.prepare_policy(model, cfg, self.device, peft_config=peft_config)
        self.policy, self.uses_adapters, self.onednn_linear = (trainable.module, trainable.uses_adapters,
                                                               trainable.onednn_linear)
        # the reference policy: none at beta 0; with LoRA the same model with adapters disabled; else a frozen copy
        self.reference = models.frozen_copy(self.policy) if cfg.beta > 0 and not self.uses_adapters else None
        # vLLM when use_vllm (synced and verified now, and before each generation after an update); else in-process
        self.engine = (make_engine(cfg, model_path or getattr(self.policy, "name_or_path", cfg.model), self.policy)
                       or TorchEngine(self.policy, self.tokenizer.pad_token_id, tokenizer=self.tokenizer,
                                      cpu_linear=cfg.cpu_linear))
        self.engine_stale = False  # the policy changed since the engine last received its weights
        self.train_data = data_mod.tokenise_prompts(self.train_records, self.tokenizer, cfg.max_prompt_length,
                                                    cfg.dataset)
        self.eval_data = (data_mod.tokenise_prompts(self.eval_records, self.tokenizer, cfg.max_prompt_length,
                                                    cfg.eval_dataset) if self.eval_records else None)
        self.validation_data = (data_mod.tokenise_prompts(self.validation_records, self.tokenizer,
                                                          cfg.max_prompt_length, cfg.validation_dataset)
                                if self.validation_records else None)
        self.stop_ids = models.stop_token_ids(self.tokenizer, self.policy)

        self.optimizer, self.scheduler = models.optimizer_and_schedule(self.policy, cfg)
        # several processes: the training forward runs through accelerate's wrapper (DDP), which all-reduces gradients
        self.train_module = None
        if self.procs.count > 1:
            self.train_module, self.optimizer = self.procs.prepare(CompletionLogProbs(self.policy), self.optimizer)
        self.loss_settings = loss_settings(cfg)
        self.loss_dtype = torch.float64 if cfg.torch_dtype == "float64" else torch.float32
        self.timers = Timers()
        self.accuracy_reward = cfg.eval_accuracy_reward or self.reward_funcs[0].name
        # with one reward the total is the correctness reward: the length-hacking check has nothing to compare
        self.health = HealthMonitor(correctness_reward=self.accuracy_reward if len(self.reward_funcs) > 1 else None)
        self.logprobs = LogProbs(cfg, self.policy, reference=self.reference, uses_adapters=self.uses_adapters,
                                 train_module=self.train_module, autocast=self.autocast)
        self.updater = Updater(cfg, self.policy, optimizer=self.optimizer, scheduler=self.scheduler,
                               logprobs=self.logprobs, settings=self.loss_settings, procs=self.procs,
                               train_module=self.train_module, device=self.device, autocast=self.autocast)
        # the rollout and its rewards; checks reward_gate against the rewards. The in-process sampler gives each
        # token's entropy where the update takes silent rows' entropy from it
        self.collector = Collector(cfg, self.train_data, engine=self.synced_engine, tokenizer=self.tokenizer,
                                   rewards=self.rewards, stop_ids=self.stop_ids, procs=self.procs, timers=self.timers,
                                   autocast=self.autocast, context=self.reward_context,
                                   entropies=self.updater.uses_sampler_entropy)
        self.state = TrainState.start(cfg.seed)
        self.stop_reason: str | None = None  # set by a step that ends the run early (on_collapse: stop)

    def synced_engine(self):
        """The engine, after pushing the policy's weights to it if they changed (a no-op for the in-process one)."""
        if self.engine_stale and self.cfg.use_vllm:
            with self.timers("weight_sync"):
                self.engine.load_weights(self.policy)
        self.engine_stale = False
        return self.engine

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    # -- the loop ------------------------------------------------------------------------------
    def train(self, resume: str | bool | None = None, force: bool = False, overwrite: bool = False) -> TrainResult:
        """Run to `max_steps`. `resume`: True for the newest checkpoint in output_dir, or a checkpoint path;
        `force` resumes even when the config changed in a way that changes the results; `overwrite` moves a run
        already in output_dir aside (without it, such a run stops this one: harness.claim_output_dir)."""
        cfg, out = self.cfg, Path(self.cfg.output_dir)
        claim_output_dir(out, resume=resume, overwrite=overwrite, main=self.procs.is_main)
        harness = RunHarness(cfg, command="train", procs=self.procs, say=self._say)
        path = resume_checkpoint(cfg, resume)
        if path is not None:
            self.restore(path, force)
            if self.procs.is_main:  # as metrics.jsonl: what the stopped run logged after the checkpoint comes again
                for name in ("alerts.jsonl", runlog.EVALUATIONS_FILE):
                    alerts.drop_after(out / name, self.state.global_step)
        summary = runlog.summary_lines(cfg, self.policy, device=self.device, onednn_linear=self.onednn_linear,
                                       train_prompts=len(self.train_data.prompt_ids),
                                       eval_prompts=len(self.eval_data.prompt_ids) if self.eval_data else None,
                                       validation_prompts=(len(self.validation_data.prompt_ids)
                                                           if self.validation_data else None))
        eval_after = None
        try:
            with harness.open(resume_step=self.state.global_step if path else None, summary=summary,
                              trackers=self.state.trackers) as metrics:
                if self.procs.is_main:  # kept in each checkpoint: a resume continues these tracker runs
                    self.state.trackers = metrics.tracker_ids()
                harness.run(step=lambda: self.step(metrics), position=lambda: self.state.global_step,
                            save=self.save_checkpoint, spent=lambda: self.state.train_seconds,
                            before=lambda: self._evaluate_on_start(metrics, path is None),
                            after=lambda step: self._evaluate_every(metrics, step), stop=lambda: self.stop_reason)
                if self.evaluates:
                    eval_after = self._evaluate(metrics, step=self.state.global_step, label="after training")
                if self.procs.is_main:
                    self.save_model(out / "final_model")
                self.procs.wait()
                before = self.state.eval_before
                if before and eval_after and "eval/accuracy" in eval_after:
                    self._say(f"held-out accuracy: {_pct(before)} before -> {_pct(eval_after)} after "
                              f"({100 * (eval_after['eval/accuracy'] - before['eval/accuracy']):+.1f} points)")
                if self.best.held_out is not None:
                    self._say(f"best model: step {self.best.step}, chosen on {self.best.metric} "
                              f"{self.best.value:.4g}; held-out accuracy there {100 * self.best.held_out:.1f}% "
                              f"({self.best.dir})")
                self._say(f"saved {out / 'final_model'}")
        finally:
            self.rewards.close()
            self.engine.close()
            self.procs.close()
        return TrainResult(output_dir=out, steps=self.state.global_step, eval_before=self.state.eval_before,
                           eval_after=eval_after)

    # -- one step ------------------------------------------------------------------------------
    def step(self, metrics_log: MetricsLogger) -> int:
        """One optimizer step: a new generation when the last one is used up, then its next accumulation window."""
        cfg, state = self.cfg, self.state
        started = time.perf_counter()
        if not state.pending:
            state.pending = self.next_generation()
        pending = state.pending
        start = pending.windows.pop(0)
        # the temperature this generation was sampled at (on_collapse adapt may have raised it since)
        self.logprobs.temperature = pending.metrics.get("temperature", cfg.temperature)
        state.global_step += 1
        with self.timers("update"):
            update_metrics = self.updater.update(pending.micro_batches[start:start + cfg.gradient_accumulation_steps])
            self._count_skip(update_metrics)
        metrics = {**pending.metrics, **update_metrics, **self.timers.pop(),
                   "learning_rate": self.scheduler.get_last_lr()[0], "num_tokens": float(state.num_tokens),
                   "step_time": time.perf_counter() - started}
        state.train_seconds += metrics["step_time"]
        pending.metrics = {k: v for k, v in pending.metrics.items() if not k.startswith("time/")}
        if not pending.windows:
            state.pending = None
        metrics_log.log(state.global_step, metrics)
        if self.procs.is_main:
            new_alerts = self.health.observe(state.global_step, metrics)
            for alert in new_alerts:
                log.warning("%s", alert)
                alerts.append(Path(cfg.output_dir) / "alerts.jsonl", alert)
            self.stop_reason = self.stop_reason or alerts.collapse_stop(new_alerts, cfg.on_collapse)
            self._adapt(new_alerts)
        if cfg.on_collapse == "adapt" and self.procs.count > 1:  # the main process's health monitor decides
            state.temperature, state.temperature_raised_at = self.procs.gather(
                (state.temperature, state.temperature_raised_at))[0]
        return state.global_step

    def _adapt(self, started: list) -> None:
        """on_collapse adapt: a collapse alert raises the sampling temperature for the generations after this step
        (each generation's log-probs use the temperature it was sampled at: `temperature` in its metrics)."""
        cfg, state = self.cfg, self.state
        current = cfg.temperature if state.temperature is None else state.temperature
        since = None if state.temperature_raised_at is None else state.global_step - state.temperature_raised_at
        raised = alerts.collapse_adapt(started, cfg.on_collapse, current, cfg.adapt_temperature_step,
                                       cfg.adapt_max_temperature, collapsing=self.health.collapsing,
                                       since_raise=since, window=self.health.window)
        if raised is None:
            return
        state.temperature, state.temperature_raised_at = raised, state.global_step
        log.warning("on_collapse adapt: the sampling temperature goes from %g to %g from the next generation on "
                    "(step %d%s)%s", current, raised, state.global_step,
                    "" if any(a.name in alerts.COLLAPSE_ALERTS for a in started)
                    else f", the collapse still holding {since} steps after the last raise",
                    "; that is adapt_max_temperature" if raised >= cfg.adapt_max_temperature else "")

    def next_generation(self) -> Pending:
        """Collect a generation (rollout, rewards), its advantages and micro-batches: the optimizer steps it makes."""
        cfg = self.cfg
        # sampled at the temperature on_collapse adapt raised to, if it did: its log-probs (old ones too) use it
        self.logprobs.temperature = cfg.temperature if self.state.temperature is None else self.state.temperature
        collected = self.collector.collect(self.state)
        advantages = self.collector.advantages(collected.batch)
        self.collector.log_completions(self.state.global_step, collected.batch, advantages, echo=self._say)
        with self.timers("logprobs"):
            micro_batches = self.micro_batches(collected.batch, advantages)
        windows = range(0, cfg.micro_batches_per_generation, cfg.gradient_accumulation_steps)
        metrics = self.collector.metrics(collected)
        if cfg.on_collapse == "adapt" or self.state.temperature is not None:
            metrics["temperature"] = self.logprobs.temperature
        return Pending(micro_batches=micro_batches, windows=[w for _ in range(cfg.num_iterations) for w in windows],
                       metrics=metrics)

    def micro_batches(self, batch: Generation, advantages: torch.Tensor) -> list[MicroBatch]:
        """This process's micro-batches of `batch`, with their old and reference log-probs."""
        return prepare_micro_batches(self.cfg, batch, advantages, logprobs=self.logprobs, procs=self.procs,
                                     pad_id=self.tokenizer.pad_token_id, device=self.device, dtype=self.loss_dtype)

    def _count_skip(self, update: dict[str, float]) -> None:
        """A real update leaves the engine's weights stale; `max_consecutive_skips` skipped ones in a row stop the
        run with a checkpoint of the last good weights."""
        if not update["skipped_step"]:
            self.engine_stale = True
        if count_skip(self.state, update, self.cfg.max_consecutive_skips):
            self.state.pending = None  # the generation that produced non-finite values is not worth resuming into
            raise skip_limit_error(self.state, update, self.cfg.max_consecutive_skips, self.save_checkpoint())

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """checkpoint-N of this step. Every process calls it (its unused micro-batches are gathered); main writes."""
        cfg = self.cfg
        path = checkpoint.save_train(Path(cfg.output_dir), self.state, policy=self.policy, tokenizer=self.tokenizer,
                                     optimizer=self.optimizer, scheduler=self.scheduler, best_model=self.best.state(),
                                     health=self.health.state(), rewards=self.rewards.state(), procs=self.procs,
                                     config_yaml=cfg.to_yaml(), keep=cfg.save_total_limit)
        self._say(f"checkpoint written: {path}")
        return path

    def restore(self, path: Path, force: bool) -> None:
        """Go on from checkpoint `path`: weights, optimizer, schedule, RNGs, the loop's state and its parts'."""
        restored = checkpoint.restore_train(path, config=self.cfg.model_dump(mode="json"), force=force,
                                            policy=self.policy, uses_adapters=self.uses_adapters,
                                            optimizer=self.optimizer, scheduler=self.scheduler, procs=self.procs,
                                            device=self.device)
        self.state = restored.state
        self.best.restore(restored.best_model)
        self.health.restore(restored.health)
        self.rewards.restore(restored.rewards)
        self.engine_stale = True  # a vLLM engine still holds the starting weights
        self._say(f"resumed from {path} at step {self.state.global_step} of {self.cfg.max_steps}")

    @property
    def evaluates(self) -> bool:
        """Held-out or validation data to evaluate on."""
        return self.eval_data is not None or self.validation_data is not None

    def _evaluate_on_start(self, metrics_log: MetricsLogger, fresh: bool) -> None:
        if self.evaluates and self.cfg.eval_on_start and fresh:  # a resumed run has its eval_before in TrainState
            self.state.eval_before = self._evaluate(metrics_log, step=0, label="before training")

    def _evaluate_every(self, metrics_log: MetricsLogger, step: int) -> None:
        cfg = self.cfg
        if self.evaluates and cfg.eval_steps and step % cfg.eval_steps == 0 and step < cfg.max_steps:
            self._evaluate(metrics_log, step=step, label=f"at step {step}")

    def _evaluate(self, metrics_log: MetricsLogger, step: int, label: str) -> dict[str, float]:
        """The held-out evaluation (eval/*) and the validation one (validation/*); then the best model's turn."""
        result: dict[str, float] = {}
        if self.eval_data is not None:
            result |= self._evaluate_split(metrics_log, self.eval_data, "eval", step, label)
        if self.validation_data is not None:
            result |= self._evaluate_split(metrics_log, self.validation_data, "validation", step, label)
        self.best.observe(result, step, self.save_model if self.procs.is_main else None)  # keep best_model/
        return result

    def _evaluate_split(self, metrics_log: MetricsLogger, data: data_mod.TokenisedPrompts, split: str, step: int,
                        label: str) -> dict[str, float]:
        limit = self.cfg.eval_max_completion_length or self.cfg.max_completion_length
        started = time.perf_counter()
        if self.procs.count > 1:  # each process evaluates its share of the prompts
            lo, hi = share(len(data.prompt_ids), self.procs.count, self.procs.index)
            data = dataclasses.replace(data, records=data.records[lo:hi], prompt_ids=data.prompt_ids[lo:hi])
        part = None
        if data.prompt_ids:
            part = evaluate_per_prompt(self.synced_engine(), self.tokenizer, data, self.rewards, self.accuracy_reward,
                                       limit, self.stop_ids, context=self.reward_context(limit), autocast=self.autocast,
                                       stop=self.cfg.stop_strings, num_samples=self.cfg.eval_num_samples,
                                       pass_k=self.cfg.eval_pass_k,
                                       sampling=eval_sampling(self.cfg, limit, self.stop_ids))
        whole = merge_results([p for p in self.procs.gather(part) if p is not None]) if self.procs.count > 1 else part
        result = {**whole.metrics, "eval/time": time.perf_counter() - started}
        if self.procs.is_main:  # which prompts were right: paired comparisons between evaluations of a run
            runlog.write_evaluation(Path(self.cfg.output_dir), step, label, whole.per_prompt.get("eval/accuracy"),
                                    split)
        if split != "eval":  # evaluate_per_prompt names its metrics eval/*
            result = {f"{split}/{k.removeprefix('eval/')}": v for k, v in result.items()}
        metrics_log.log(step, result, show=False)
        name = "held-out" if split == "eval" else split
        self._say(f"{name} accuracy {label}: {_pct(result, split)} ({result[f'{split}/time']:.0f}s)")
        return result

    def reward_context(self, max_completion_length: int | None = None) -> dict:
        """Run facts a reward may name: max_completion_length, step, trainer_state (TRL's key)."""
        return {"max_completion_length": max_completion_length or self.cfg.max_completion_length,
                "step": self.state.global_step,
                "trainer_state": {"global_step": self.state.global_step, "max_steps": self.cfg.max_steps}}

    def save_model(self, path: Path) -> None:
        self.policy.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def _say(self, line: str) -> None:
        log.info(line)  # the CLI shows grpokit's info lines on stdout; the run's log file gets them too


def _pct(result: dict[str, float], split: str = "eval") -> str:
    return (f"{result[f'{split}/accuracy']:.1%} ({int(result.get(f'{split}/num_correct', 0))}/"
            f"{int(result[f'{split}/num_prompts'])})")

