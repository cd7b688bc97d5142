"""The GRPO loop: rollout -> rewards -> advantages -> policy update, one optimizer step at a time.

Each generation samples `prompts_per_generation` prompts x `num_generations` completions with
the in-process sampler and scores them; with `dynamic_sampling`, groups whose rewards have zero
spread are dropped and refilled from fresh prompts (DAPO). The generation is cut into
`steps_per_generation` micro-batches of `per_device_train_batch_size` completions; every
`gradient_accumulation_steps` of them make one optimizer step, and the whole pass repeats
`num_iterations` times. Old log-probs are computed once per generation when the policy moves
before a micro-batch is used (num_iterations > 1 or several steps per generation); otherwise the
detached policy log-probs stand in (the ratio is then exactly 1 and only its gradient matters).
Reference log-probs come from a frozen copy of the starting policy, and only when `beta > 0`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from grpokit.observe import alerts
from grpokit.train import checkpoint
from grpokit.models import cpu_linear
from grpokit.observe import runlog
from grpokit.data import loading as data_mod
from grpokit.observe.alerts import HealthMonitor, identical_fraction
from grpokit.algo.advantages import combine_rewards, compute_advantages, gate_rewards, group_stats
from grpokit.algo.batches import Generation, MicroBatch, Pending, pack
from grpokit.train.best_model import BestModel
from grpokit.config import GRPOConfig
from grpokit.runtime.distributed import Processes, sample_ranges, share, world_size
from grpokit.runtime.distributed import rank as process_rank
from grpokit.errors import ConfigError, Interrupted, TrainingError
from grpokit.evaluation.evaluate import columns_of, decode_completions, eval_sampling, evaluate_per_prompt, merge_results
from grpokit.models.logprobs import CompletionLogProbs, completion_logps
from grpokit.algo.loss import LossSettings, StepTotals, grpo_loss
from grpokit.observe.metrics import MetricsLogger, Timers, check_sinks, generation_metrics
from grpokit.models.loading import (add_lora, bnb_4bit_kwargs, check_quantization, frozen_copy, load_policy, load_tokenizer,
                            optimizer_and_schedule, prepare_tokenizer, resolve_model_path)
from grpokit.rewards import RewardBatch, RewardFunction, RewardRunner, resolve_rewards
from grpokit.rollout.base import SamplingParams
from grpokit.rollout.torch_engine import TorchEngine
from grpokit.rollout.vllm_engine import make_engine

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
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        check_quantization(cfg)  # load_in_4bit without a CUDA GPU or bitsandbytes: fail before data and model load
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        # data and rewards first: their errors must come before the (slow) model load
        self.reward_funcs: list[RewardFunction] = resolve_rewards(reward_funcs or cfg.reward_funcs)
        self.train_records = train_records if train_records is not None else data_mod.dataset_records(cfg, "train")
        self.eval_records = eval_records if eval_records is not None else data_mod.dataset_records(cfg, "eval")
        if self.eval_records:
            self.eval_records = data_mod.without_train_prompts(self.eval_records, self.train_records,
                                                               cfg.eval_dataset or "eval_dataset")
        if self.eval_records and cfg.eval_limit:
            self.eval_records = self.eval_records[:cfg.eval_limit]
        if cfg.num_train_epochs is not None:  # epochs -> steps, now that the data size is known (config.py)
            steps = cfg.steps_for_epochs(len(self.train_records))
            log.info("%g epoch(s) over %d prompts = %d optimizer steps", cfg.num_train_epochs, len(self.train_records), steps)
            self.cfg = cfg = cfg.model_copy(update={"max_steps": steps, "num_train_epochs": None})

        for f in self.reward_funcs:  # a reward argument that matches no column fails now, not at step 1
            f.check_columns(self.train_records[0].keys())
        self.best = BestModel(cfg, [f.name for f in self.reward_funcs], bool(self.eval_records))  # checked before the model loads
        check_sinks(cfg.report_to)  # a tracker asked for but not installed fails now, not after the model loads
        if cfg.use_vllm and world_size() > 1:
            raise ConfigError(f"use_vllm with {world_size()} processes is not supported yet: each process generates "
                              "with the in-process sampler; drop use_vllm, or run one process with vLLM")
        # reward workers fork now, while this process is small and before the process group starts (runner.py)
        errors_file = "reward_errors.jsonl" if process_rank() == 0 else f"reward_errors.rank{process_rank()}.jsonl"
        self.rewards = RewardRunner(self.reward_funcs, timeout=cfg.reward_timeout, error_rate_limit=cfg.reward_error_rate_limit,
                                    error_log=Path(cfg.output_dir) / errors_file)
        self.procs = Processes(cpu=self.device.type == "cpu")  # several under accelerate launch / torchrun
        if self.procs.count > 1:
            self.device = self.procs.device
            if not self.procs.is_main:  # one process speaks for the job; warnings still come from every one
                logging.getLogger("grpokit").setLevel(logging.WARNING)
        model_path = resolve_model_path(cfg.model) if model is None or tokenizer is None else None
        self.tokenizer = prepare_tokenizer(tokenizer) if tokenizer is not None else load_tokenizer(model_path)
        self.policy = (model if model is not None else load_policy(model_path, getattr(torch, cfg.torch_dtype),
                                                                   quantization=bnb_4bit_kwargs(cfg), device=self.device)
                       ).to(self.device)
        if cfg.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if peft_config is not None:
            from peft import get_peft_model

            self.policy = get_peft_model(self.policy, peft_config)
        elif cfg.use_peft:
            self.policy = add_lora(self.policy, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
        self.uses_adapters = peft_config is not None or cfg.use_peft
        self.policy.train()
        self.onednn_linear = cpu_linear.apply(self.policy, cfg.cpu_linear, self.device)  # before the frozen copy
        # the reference policy: none at beta 0; with LoRA the same model with adapters disabled; else a frozen copy
        self.reference = frozen_copy(self.policy) if cfg.beta > 0 and not self.uses_adapters else None
        # vLLM when use_vllm (synced and verified now, and before each generation after an update); else in-process
        self.engine = (make_engine(cfg, model_path or getattr(self.policy, "name_or_path", cfg.model), self.policy)
                       or TorchEngine(self.policy, self.tokenizer.pad_token_id, tokenizer=self.tokenizer))
        self.engine_stale = False  # the policy changed since the engine last received its weights
        self.train_data = data_mod.tokenise_prompts(self.train_records, self.tokenizer, cfg.max_prompt_length, cfg.dataset)
        self.eval_data = (data_mod.tokenise_prompts(self.eval_records, self.tokenizer, cfg.max_prompt_length, cfg.eval_dataset)
                          if self.eval_records else None)
        self.stop_ids = sorted({self.tokenizer.eos_token_id, *self._generation_eos()})

        self.optimizer, self.scheduler = optimizer_and_schedule(self.policy, cfg)
        # several processes: the training forward runs through accelerate's wrapper (DDP), which all-reduces gradients
        self.train_module = None
        if self.procs.count > 1:
            self.train_module, self.optimizer = self.procs.prepare(CompletionLogProbs(self.policy), self.optimizer)
        self.loss_settings = LossSettings(loss_type=cfg.loss_type, importance_sampling_level=cfg.importance_sampling_level,
                                          epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta, beta=cfg.beta,
                                          top_entropy_quantile=cfg.top_entropy_quantile,
                                          max_completion_length=cfg.max_completion_length)
        self.loss_dtype = torch.float64 if cfg.torch_dtype == "float64" else torch.float32
        self.reward_weights = torch.tensor(cfg.weights, dtype=torch.float64)
        names = [f.name for f in self.reward_funcs]
        if cfg.reward_combination == "gated" and cfg.reward_gate not in names:
            raise ConfigError(f"reward_gate '{cfg.reward_gate}' is not one of the rewards {names}")
        self.reward_gate = names.index(cfg.reward_gate) if cfg.reward_combination == "gated" else None
        self.accuracy_reward = cfg.eval_accuracy_reward or self.reward_funcs[0].name
        # with one reward the total is the correctness reward: the length-hacking check has nothing to compare
        self.health = HealthMonitor(correctness_reward=self.accuracy_reward if len(self.reward_funcs) > 1 else None)
        self.timers = Timers()
        self._order: list[int] = []
        self._order_rng = random.Random(cfg.seed)
        self.num_tokens = 0
        self.generations = 0  # seeds each generation's sampler, so a run is reproducible
        self.global_step = 0
        self.pending: Pending | None = None
        self.consecutive_skips = 0
        self.eval_before: dict[str, float] | None = None

    def _generation_eos(self) -> list[int]:
        eos = getattr(self.policy.generation_config, "eos_token_id", None)
        return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    def synced_engine(self):
        """The engine, after pushing the policy's weights to it if they changed (a no-op for the in-process one)."""
        if self.engine_stale and self.cfg.use_vllm:
            with self.timers("weight_sync"):
                self.engine.load_weights(self.policy)
        self.engine_stale = False
        return self.engine

    def combinable(self, rewards: torch.Tensor) -> torch.Tensor:
        """[N, K] rewards as they enter the weighted sum (gated when reward_combination is 'gated')."""
        if self.reward_gate is None:
            return rewards
        return gate_rewards(rewards, self.reward_gate, self.cfg.reward_gate_threshold)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    # -- the loop ------------------------------------------------------------------------------
    def train(self, resume: str | bool | None = None, force: bool = False) -> TrainResult:
        """Run to `max_steps`. `resume`: True for the newest checkpoint in output_dir, or a checkpoint path;
        `force` resumes even when the config changed in a way that changes the results."""
        cfg = self.cfg
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            self._restore(checkpoint.find(out, resume), force)
        main = self.procs.is_main  # with several processes, only the main one writes the run directory
        if main:
            (out / "config.yaml").write_text(cfg.to_yaml())
            if resume:  # as metrics.jsonl: the stopped run's alerts after the checkpoint come again
                alerts.drop_after(out / "alerts.jsonl", self.global_step)
        handler = logging.FileHandler(out / "training_log.txt") if main else logging.NullHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("grpokit").addHandler(handler)
        metrics_log = (MetricsLogger(out, cfg.max_steps, cfg.logging_steps, echo=self._say,
                                     resume_step=self.global_step if resume else None, report_to=cfg.report_to,
                                     run_config=cfg.model_dump(mode="json"), run_name=out.name)
                       if main else _Silent())
        for line in runlog.summary_lines(cfg, self.policy, device=self.device, train_prompts=len(self.train_data.prompt_ids),
                                         eval_prompts=len(self.eval_data.prompt_ids) if self.eval_data else None,
                                         onednn_linear=self.onednn_linear):
            self._say(line)
        eval_after = None
        try:
            with checkpoint.StopSignals(self._say) as signals:
                if self.eval_data and cfg.eval_on_start and not resume:
                    self.eval_before = self._evaluate(metrics_log, step=0, label="before training")
                while self.global_step < cfg.max_steps:
                    step = self._step(metrics_log)
                    if self.eval_data and cfg.eval_steps and step % cfg.eval_steps == 0 and step < cfg.max_steps:
                        self._evaluate(metrics_log, step=step, label=f"at step {step}")
                    received = signals.received
                    if self.procs.count > 1:  # every process stops after the same step, whichever got the signal
                        received = max((r for r in self.procs.gather(received) if r is not None), default=None)
                    if received is not None:
                        path = self._checkpoint()
                        raise Interrupted(f"stopped by {signal.Signals(received).name} after step {step}; "
                                          f"checkpoint written to {path}. Resume with: grpokit train CONFIG --resume",
                                          128 + received)
                    if cfg.save_steps and step % cfg.save_steps == 0 and step < cfg.max_steps:
                        self._checkpoint()
            if self.eval_data:
                eval_after = self._evaluate(metrics_log, step=self.global_step, label="after training")
            if main:
                self._save(out / "final_model")
            self.procs.wait()
            before = self.eval_before
            if before and eval_after:
                self._say(f"held-out accuracy: {_pct(before)} before -> {_pct(eval_after)} after "
                          f"({100 * (eval_after['eval/accuracy'] - before['eval/accuracy']):+.1f} points)")
            self._say(f"saved {out / 'final_model'}")
        finally:
            self.rewards.close()
            self.engine.close()
            metrics_log.close()
            logging.getLogger("grpokit").removeHandler(handler)
            handler.close()
            self.procs.close()
        return TrainResult(output_dir=out, steps=self.global_step, eval_before=self.eval_before, eval_after=eval_after)

    def _step(self, metrics_log: MetricsLogger) -> int:
        """One optimizer step: a new generation when the last one is used up, then the next accumulation window."""
        cfg = self.cfg
        started = time.perf_counter()
        if not self.pending:
            batch, metrics = self._generate_and_score()
            windows = range(0, cfg.micro_batches_per_generation, cfg.gradient_accumulation_steps)
            self.pending = Pending(micro_batches=batch, windows=[w for _ in range(cfg.num_iterations) for w in windows],
                                   metrics=metrics)
        pending = self.pending
        start = pending.windows.pop(0)
        self.global_step += 1
        with self.timers("update"):
            update_metrics = self._update(pending.micro_batches[start:start + cfg.gradient_accumulation_steps])
        metrics = {**pending.metrics, **update_metrics, **self.timers.pop(),
                   "learning_rate": self.scheduler.get_last_lr()[0], "num_tokens": float(self.num_tokens),
                   "step_time": time.perf_counter() - started}
        pending.metrics = {k: v for k, v in pending.metrics.items() if not k.startswith("time/")}
        if not pending.windows:
            self.pending = None
        metrics_log.log(self.global_step, metrics)
        if self.procs.is_main:
            for alert in self.health.observe(self.global_step, metrics):
                log.warning("%s", alert)
                with open(Path(cfg.output_dir) / "alerts.jsonl", "a") as f:
                    f.write(json.dumps(dataclasses.asdict(alert)) + "\n")
        return self.global_step

    def _checkpoint(self) -> Path:
        path = checkpoint.save_run(self)  # every process calls it (its unused micro-batches are gathered); main writes
        self._say(f"checkpoint written: {path}")
        return path

    def _restore(self, path: Path, force: bool) -> None:
        checkpoint.restore_run(self, path, force)
        self._say(f"resumed from {path} at step {self.global_step} of {self.cfg.max_steps}")

    # -- phases --------------------------------------------------------------------------------
    def _next_prompts(self, count: int) -> list[int]:
        picked = []
        while len(picked) < count:
            if not self._order:
                self._order = list(range(len(self.train_data.prompt_ids)))
                self._order_rng.shuffle(self._order)
            picked.append(self._order.pop())
        return picked

    def _sample_groups(self, n_prompts: int) -> Generation:
        cfg, g = self.cfg, self.cfg.num_generations
        indices = self._next_prompts(n_prompts)
        self.generations += 1
        prompt_ids = [self.train_data.prompt_ids[i] for i in indices]
        records = [self.train_data.records[i] for i in indices]
        params = SamplingParams(max_tokens=cfg.max_completion_length, stop_token_ids=self.stop_ids,
                                seed=cfg.seed * 1_000_003 + self.generations, **cfg.sampling())
        all_prompt_ids = [p for p in prompt_ids for _ in range(g)]
        if self.procs.count == 1:
            local = self._sample_rows(prompt_ids, records, None, params)
        else:  # this process's rows; a group may straddle two processes (distributed.py)
            lo, hi = share(len(all_prompt_ids), self.procs.count, self.procs.index)
            first, samples = sample_ranges(lo, hi, g)
            span = slice(first, first + len(samples))
            local = self._sample_rows(prompt_ids[span], records[span], samples, params)
            with self.timers("gather"):
                local = Generation.concat(self.procs.gather(local))  # every process now holds every row
        local.prompt_ids = all_prompt_ids
        self.num_tokens += sum(len(c) for c in local.completion_ids) + sum(len(p) for p in all_prompt_ids)
        return local

    def _sample_rows(self, prompt_ids: list[list[int]], records: list[dict], samples: list[range] | None,
                     params: SamplingParams) -> Generation:
        """Generate and score: n completions of each prompt, or with `samples` the given sample indices of each."""
        g = self.cfg.num_generations
        counts = [g] * len(prompt_ids) if samples is None else [len(r) for r in samples]
        row_records = [r for r, c in zip(records, counts, strict=True) for _ in range(c)]
        if not row_records:  # more processes than rows: this one sits the generation out
            return Generation(prompts=[], completions=[], prompt_ids=[], completion_ids=[], finish_reasons=[],
                              rewards=torch.empty((0, len(self.reward_funcs)), dtype=torch.float64))
        with self.timers("generate"), self.autocast():
            extra = {} if samples is None else {"samples": samples}
            rollout = self.synced_engine().generate(prompt_ids, g, params, **extra)
        with self.timers("rewards"):
            conversational = isinstance(records[0]["prompt"], list)
            completions = decode_completions(self.tokenizer, rollout.completion_ids, conversational)
            prompts = [r["prompt"] for r in row_records]
            rewards = self.rewards.score(RewardBatch(prompts=prompts, completions=completions,
                                                     completion_ids=rollout.completion_ids,
                                                     columns=columns_of(row_records, 1), context=self.reward_context()))
        return Generation(prompts=prompts, completions=completions,
                          prompt_ids=[p for p, c in zip(prompt_ids, counts, strict=True) for _ in range(c)],
                          completion_ids=rollout.completion_ids, finish_reasons=list(rollout.finish_reasons),
                          rewards=rewards)

    def _generate_and_score(self) -> tuple[list[MicroBatch], dict[str, float]]:
        cfg, g = self.cfg, self.cfg.num_generations
        need = cfg.prompts_per_generation
        sampled = [self._sample_groups(need)]
        extra: dict[str, float] = {}
        if cfg.dynamic_sampling:
            batch, extra = self._dynamic_sampling(sampled, need)
        else:
            batch = sampled[0]
        aggregation = "normalize_then_sum" if cfg.reward_combination == "normalize_then_sum" else "weighted_sum"
        advantages, _ = compute_advantages(self.combinable(batch.rewards), self.reward_weights, g, cfg.scale_rewards,
                                           aggregation)
        every = cfg.log_completions_steps
        if (every and self.procs.is_main  # every process holds the whole generation; one writes it
                and (self.global_step + cfg.optimizer_steps_per_generation) // every > self.global_step // every):
            runlog.log_completions(cfg.output_dir, self.global_step + 1, batch.prompts, batch.completions,
                                   [f.name for f in self.reward_funcs], batch.rewards, advantages, batch.finish_reasons,
                                   echo=self._say, total_rewards=combine_rewards(self.combinable(batch.rewards),
                                                                                 self.reward_weights))
        with self.timers("logprobs"):
            micro_batches = self._micro_batches(batch, advantages)
        return micro_batches, {**self._generation_metrics(Generation.concat(sampled)), **extra}

    def _dynamic_sampling(self, sampled: list[Generation], need: int) -> tuple[Generation, dict[str, float]]:
        """Keep groups with reward spread; refill from fresh prompts; top up with silent groups if rounds run out."""
        g = self.cfg.num_generations
        kept: list[Generation] = []
        spare: list[Generation] = []
        rounds = dropped = 0
        while True:
            _, _, zero_spread = group_stats(combine_rewards(self.combinable(sampled[-1].rewards), self.reward_weights), g)
            kept.append(sampled[-1].groups((~zero_spread).nonzero().flatten().tolist(), g))
            spare.append(sampled[-1].groups(zero_spread.nonzero().flatten().tolist(), g))
            dropped += int(zero_spread.sum())
            have = sum(len(k.completion_ids) for k in kept) // g
            if have >= need or rounds >= self.cfg.max_resample_rounds:
                break
            rounds += 1
            sampled.append(self._sample_groups(need - have))
        batch = Generation.concat(kept + spare)  # silent groups last: used only if the kept ones fall short
        filled = max(0, need - have)
        if filled:
            log.warning("dynamic sampling: %d of %d groups still had zero reward spread after %d refill round(s); "
                        "they fill the batch with advantage 0 (raise max_resample_rounds, or the task is too easy "
                        "or too hard for the model)", filled, need, rounds)
        batch = batch.groups(list(range(need)), g)
        return batch, {"dynamic_sampling/dropped_groups": float(dropped), "dynamic_sampling/rounds": float(rounds),
                       "dynamic_sampling/zero_spread_groups_kept": float(filled)}

    def _micro_batches(self, batch: Generation, advantages: torch.Tensor) -> list[MicroBatch]:
        """This process's micro-batches, window by window; each carries its window's step-wide loss normaliser.

        A window (one optimizer step) is `per_device_train_batch_size x gradient_accumulation_steps x processes`
        consecutive rows; process r trains on the r-th part of each window."""
        cfg = self.cfg
        size, accumulation = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
        policy_moves = cfg.num_iterations > 1 or cfg.micro_batches_per_generation > cfg.gradient_accumulation_steps
        counted = [len(c) if f == "stop" or not cfg.mask_truncated_completions else 0
                   for c, f in zip(batch.completion_ids, batch.finish_reasons, strict=True)]  # tokens in the loss
        window = size * accumulation * self.procs.count
        micro_batches = []
        for window_start in range(0, len(batch.completion_ids), window):
            totals = StepTotals(num_sequences=len(counted[window_start:window_start + window]),
                                num_tokens=sum(counted[window_start:window_start + window]))
            part = window_start + self.procs.index * size * accumulation
            if cfg.loss_type == "bnpo":  # this process's tokens (loss.py); x processes undoes DDP's mean over processes
                totals.num_tokens = sum(counted[part:part + size * accumulation]) * self.procs.count
            for start in range(part, part + size * accumulation, size):
                micro_batches.append(self._micro_batch(batch, advantages, slice(start, start + size), totals,
                                                       policy_moves))
        return micro_batches

    def _micro_batch(self, batch: Generation, advantages: torch.Tensor, sl: slice, totals: StepTotals,
                     policy_moves: bool) -> MicroBatch:
        cfg = self.cfg
        input_ids, attention, cmask = pack(batch.prompt_ids[sl], batch.completion_ids[sl],
                                           self.tokenizer.pad_token_id, self.device)
        if cfg.mask_truncated_completions:
            finished = torch.tensor([f == "stop" for f in batch.finish_reasons[sl]], device=self.device)
            cmask = cmask * finished[:, None]
        mb = MicroBatch(input_ids=input_ids, attention_mask=attention, completion_mask=cmask,
                        advantages=advantages[sl].to(self.device, self.loss_dtype),
                        step_sequences=totals.num_sequences, step_tokens=totals.num_tokens)
        with torch.no_grad(), self.autocast():
            if policy_moves:
                mb.old_logps, _ = self._logps(self.policy, mb)
            mb.ref_logps = self._reference_logps(mb)
        return mb

    def _reference_logps(self, mb: MicroBatch) -> torch.Tensor | None:
        if self.cfg.beta == 0:
            return None
        if self.uses_adapters:
            with self.policy.disable_adapter():
                return self._logps(self.policy, mb)[0]
        return self._logps(self.reference, mb)[0]

    def _train_logps(self, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's log-probs with autograd, through the data-parallel wrapper when there is one."""
        if self.train_module is None:
            return self._logps(self.policy, mb)
        return self.train_module(mb.input_ids, mb.attention_mask, mb.completion_mask.shape[1], self.cfg.temperature,
                                 self.cfg.logprob_chunk_size, self.cfg.share_prompt_forward)

    def _logps(self, model, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return completion_logps(model, mb.input_ids, mb.attention_mask, mb.completion_mask.shape[1],
                                self.cfg.temperature, self.cfg.logprob_chunk_size, self.cfg.share_prompt_forward)

    def _update(self, window: list[MicroBatch]) -> dict[str, float]:
        """One optimizer step over the micro-batches of one accumulation window."""
        if window[0].step_sequences is None:  # micro-batches from a checkpoint written before the fields existed
            totals = StepTotals(num_sequences=sum(len(mb.advantages) for mb in window),
                                num_tokens=int(sum(mb.completion_mask.sum() for mb in window)))
        else:  # the whole window's, over every process
            totals = StepTotals(num_sequences=window[0].step_sequences, num_tokens=window[0].step_tokens)
        sums: dict[str, torch.Tensor] = {}
        loss_total = torch.zeros((), device=self.device)
        for i, mb in enumerate(window):
            with self.procs.no_sync(self.train_module, skip=i < len(window) - 1):  # all-reduce on the last one
                with self.autocast():
                    policy_logps, entropy = self._train_logps(mb)
                old = mb.old_logps if mb.old_logps is not None else policy_logps.detach()
                loss, metrics = grpo_loss(policy_logps, old, mb.ref_logps, mb.advantages, mb.completion_mask,
                                          self.loss_settings, totals, entropy=entropy)
                self.procs.backward(loss)
            loss_total = loss_total + loss.detach()
            n_tok = mb.completion_mask.sum()
            metrics["entropy"] = (entropy * mb.completion_mask).sum() / n_tok.clamp(min=1)
            for key, value in metrics.items():  # tensors until the end of the step: no device sync per micro-batch
                sums[key] = sums.get(key, 0.0) + value.detach() * n_tok
        if self.procs.count > 1:  # the loss and metric sums over every process, in one all-reduce
            keys = sorted(sums)
            summed = self.procs.sum(torch.stack([loss_total, *(sums[k].to(loss_total.dtype) for k in keys)]))
            loss_total, sums = summed[0], dict(zip(keys, summed[1:], strict=True))
        params = [p for p in self.policy.parameters() if p.requires_grad]
        grad_norm = self.procs.clip_grad_norm(params, self.cfg.max_grad_norm)
        loss_total = float(loss_total)
        skipped = not (math.isfinite(grad_norm) and math.isfinite(loss_total))
        if skipped:  # weights and optimizer state stay as they were
            self.optimizer.zero_grad(set_to_none=True)
            self._skip(loss_total, grad_norm)
        else:
            self.optimizer.step()
            self.engine_stale = True
            self.scheduler.step()  # the schedule moves with real updates only
            self.consecutive_skips = 0
        self.optimizer.zero_grad(set_to_none=True)
        out = {key: float(value) / max(totals.num_tokens, 1) for key, value in sums.items()}
        out.update(loss=loss_total, grad_norm=grad_norm, skipped_step=float(skipped))
        return out

    def _skip(self, loss: float, grad_norm: float) -> None:
        self.consecutive_skips += 1
        limit = self.cfg.max_consecutive_skips
        log.warning("step %d: non-finite loss (%s) or gradient norm (%s); optimizer step skipped, weights unchanged "
                    "(%d in a row, the run stops at %d)", self.global_step, loss, grad_norm, self.consecutive_skips, limit)
        if self.consecutive_skips >= limit:
            self.pending = None  # the generation that produced non-finite values is not worth resuming into
            path = self._checkpoint()
            raise TrainingError(f"stopped at step {self.global_step}: {limit} optimizer steps in a row had a non-finite "
                                f"loss or gradient norm (last: loss {loss}, grad norm {grad_norm}). The weights are "
                                f"those before the first skipped step, saved in {path}. Likely causes: a learning rate "
                                "too high, fp16 overflow, or NaN/inf from the model; lower learning_rate or "
                                "max_grad_norm, or use bf16/fp32")

    def _generation_metrics(self, sampled: Generation) -> dict[str, float]:
        """Reward and length statistics over everything sampled this step (dropped groups included)."""
        totals = combine_rewards(self.combinable(sampled.rewards), self.reward_weights)
        m = generation_metrics(totals, sampled.rewards, [f.name for f in self.reward_funcs], sampled.completion_ids,
                               sampled.finish_reasons, self.cfg.num_generations)
        m["completions/frac_identical_in_group"] = identical_fraction(sampled.completion_ids, self.cfg.num_generations)
        m.update(self.rewards.pop_metrics())
        m["tokens_per_second"] = sum(len(c) for c in sampled.completion_ids) / max(self.timers.totals.get("generate", 0.0), 1e-9)
        return m

    def _evaluate(self, metrics_log: MetricsLogger, step: int, label: str) -> dict[str, float]:
        limit = self.cfg.eval_max_completion_length or self.cfg.max_completion_length
        started = time.perf_counter()
        data = self.eval_data
        if self.procs.count > 1:  # each process evaluates its share of the prompts
            lo, hi = share(len(data.prompt_ids), self.procs.count, self.procs.index)
            data = dataclasses.replace(data, records=data.records[lo:hi], prompt_ids=data.prompt_ids[lo:hi])
        part = None
        if data.prompt_ids:
            part = evaluate_per_prompt(self.synced_engine(), self.tokenizer, data, self.rewards, self.accuracy_reward,
                                       limit, self.stop_ids, context=self.reward_context(limit), autocast=self.autocast,
                                       stop=self.cfg.stop_strings, num_samples=self.cfg.eval_num_samples,
                                       pass_k=self.cfg.eval_pass_k, sampling=eval_sampling(self.cfg, limit, self.stop_ids))
        result = merge_results([p for p in self.procs.gather(part) if p is not None]) if self.procs.count > 1 else part.metrics
        result["eval/time"] = time.perf_counter() - started
        metrics_log.log(step, result, show=False)
        self._say(f"held-out accuracy {label}: {_pct(result)} ({result['eval/time']:.0f}s)")
        self.best.observe(result, step, self._save if self.procs.is_main else None)  # keep best_model/
        return result

    def reward_context(self, max_completion_length: int | None = None) -> dict:
        """Run facts a reward may name: max_completion_length, step, trainer_state (TRL's key)."""
        return {"max_completion_length": max_completion_length or self.cfg.max_completion_length,
                "step": self.global_step, "trainer_state": {"global_step": self.global_step, "max_steps": self.cfg.max_steps}}

    def _save(self, path: Path) -> None:
        self.policy.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def _say(self, line: str) -> None:
        log.info(line)  # the CLI shows grpokit's info lines on stdout; the run's log file gets them too



class _Silent:
    """The metrics logger of a process other than the main one."""

    def log(self, step: int, metrics: dict[str, float], show: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def _pct(result: dict[str, float]) -> str:
    return f"{result['eval/accuracy']:.1%} ({int(result.get('eval/num_correct', 0))}/{int(result['eval/num_prompts'])})"

