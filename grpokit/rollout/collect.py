"""Collecting one generation: prompts drawn from the data order, `num_generations` completions each, scored.

With several processes each samples and scores its share of the rows (a group may straddle two processes,
distributed.py) and every process then holds the whole generation. With `dynamic_sampling`, groups whose
rewards have zero spread are dropped and refilled from fresh prompts (DAPO), the first draw optionally oversampled
(`dynamic_sampling_oversample`) so one batched generation finds the groups with spread. The rewards' combination (the
weighted sum, gated when `reward_combination` is "gated") and the advantages are computed here too, so the
rule that drops a group and the advantages it would get agree.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch

from grpokit.algo.advantages import combine_rewards, compute_advantages, gate_rewards, group_stats
from grpokit.algo.batches import Generation
from grpokit.config.schema import GRPOConfig
from grpokit.data.loading import TokenisedPrompts
from grpokit.errors import ConfigError
from grpokit.observe import runlog
from grpokit.observe.alerts import identical_fraction
from grpokit.observe.metrics import Timers, generation_metrics
from grpokit.rewards import RewardBatch, RewardRunner
from grpokit.rewards.contract import columns_of, decode_completions
from grpokit.rollout.base import Engine, SamplingParams
from grpokit.runtime.distributed import Processes, sample_ranges, share

log = logging.getLogger(__name__)


class RunPosition(Protocol):
    """What the collector reads and moves of the loop's state (train/state.py's TrainState): the data order,
    the sampler counter that seeds each call, the sampled-token count."""

    generations: int
    num_tokens: int
    temperature: float | None  # the sampling temperature when on_collapse adapt changed it, else None

    def next_prompts(self, count: int, num_prompts: int) -> list[int]: ...


@dataclass(slots=True, kw_only=True)
class Collected:
    batch: Generation  # the generation trained on: `prompts_per_generation` whole groups
    sampled: Generation  # everything sampled for it, dropped groups included (the generation's metrics)
    metrics: dict[str, float]  # dynamic sampling's counts; empty without it


class Collector:
    """Samples and scores generations for one run. `engine` gives the engine to sample with (after any weight
    sync), `context` the run facts a reward may name, `autocast` the forward passes' autocast context; `entropies`:
    ask the engine for each token's entropy (the update's metric for rows it does not train on)."""

    def __init__(self, cfg: GRPOConfig, data: TokenisedPrompts, *, engine: Callable[[], Engine], tokenizer,
                 rewards: RewardRunner, stop_ids: list[int], procs: Processes, timers: Timers,
                 autocast: Callable[[], AbstractContextManager], context: Callable[[], dict], entropies: bool = False):
        self.cfg, self.data, self.engine, self.tokenizer, self.rewards = cfg, data, engine, tokenizer, rewards
        self.stop_ids, self.procs, self.timers, self.autocast, self.context = stop_ids, procs, timers, autocast, context
        self.entropies = entropies
        self.reward_names = [f.name for f in rewards.funcs]
        self.reward_weights = torch.tensor(cfg.weights, dtype=torch.float64)
        if cfg.reward_combination == "gated" and cfg.reward_gate not in self.reward_names:
            raise ConfigError(f"reward_gate '{cfg.reward_gate}' is not one of the rewards {self.reward_names}")
        self.reward_gate = self.reward_names.index(cfg.reward_gate) if cfg.reward_combination == "gated" else None

    # -- rewards -> advantages -----------------------------------------------------------------
    def combinable(self, rewards: torch.Tensor) -> torch.Tensor:
        """[N, K] rewards as they enter the weighted sum (gated when reward_combination is 'gated')."""
        if self.reward_gate is None:
            return rewards
        return gate_rewards(rewards, self.reward_gate, self.cfg.reward_gate_threshold)

    def totals(self, rewards: torch.Tensor) -> torch.Tensor:
        """[N, K] rewards -> [N] the total reward of each completion."""
        return combine_rewards(self.combinable(rewards), self.reward_weights)

    def advantages(self, batch: Generation) -> torch.Tensor:
        cfg = self.cfg
        aggregation = "normalize_then_sum" if cfg.reward_combination == "normalize_then_sum" else "weighted_sum"
        advantages, _ = compute_advantages(self.combinable(batch.rewards), self.reward_weights, cfg.num_generations,
                                           cfg.scale_rewards, aggregation, cfg.failed_group_advantage)
        return advantages

    # -- sampling ------------------------------------------------------------------------------
    def collect(self, state: RunPosition) -> Collected:
        """One generation of `prompts_per_generation` groups (with dynamic sampling, of groups with spread)."""
        need = self.cfg.prompts_per_generation
        first = math.ceil(self.cfg.dynamic_sampling_oversample * need - 1e-9) if self.cfg.dynamic_sampling else need
        sampled = [self.sample_groups(state, first)]
        if self.cfg.dynamic_sampling:
            batch, metrics = self._dynamic_sampling(state, sampled, need)
        else:
            batch, metrics = sampled[0], {}
        return Collected(batch=batch, sampled=Generation.concat(sampled), metrics=metrics)

    def sample_groups(self, state: RunPosition, n_prompts: int) -> Generation:
        """`n_prompts` prompts from the data order x `num_generations` completions each, scored."""
        cfg, g = self.cfg, self.cfg.num_generations
        indices = state.next_prompts(n_prompts, len(self.data.prompt_ids))
        state.generations += 1
        prompt_ids = [self.data.prompt_ids[i] for i in indices]
        records = [self.data.records[i] for i in indices]
        sampling = cfg.sampling()
        if state.temperature is not None:
            sampling["temperature"] = state.temperature
        params = SamplingParams(max_tokens=cfg.max_completion_length, stop_token_ids=self.stop_ids,
                                seed=cfg.seed * 1_000_003 + state.generations, entropies=self.entropies, **sampling)
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
        state.num_tokens += sum(len(c) for c in local.completion_ids) + sum(len(p) for p in all_prompt_ids)
        return local

    def _sample_rows(self, prompt_ids: list[list[int]], records: list[dict], samples: list[range] | None,
                     params: SamplingParams) -> Generation:
        """Generate and score: n completions of each prompt, or with `samples` the given sample indices of each."""
        g = self.cfg.num_generations
        counts = [g] * len(prompt_ids) if samples is None else [len(r) for r in samples]
        row_records = [r for r, c in zip(records, counts, strict=True) for _ in range(c)]
        if not row_records:  # more processes than rows: this one sits the generation out
            return Generation(prompts=[], completions=[], prompt_ids=[], completion_ids=[], finish_reasons=[],
                              rewards=torch.empty((0, len(self.reward_names)), dtype=torch.float64),
                              sampler_entropies=[])
        with self.timers("generate"), self.autocast():
            extra = {} if samples is None else {"samples": samples}
            rollout = self.engine().generate(prompt_ids, g, params, **extra)
        with self.timers("rewards"):
            conversational = isinstance(records[0]["prompt"], list)
            completions = decode_completions(self.tokenizer, rollout.completion_ids, conversational)
            prompts = [r["prompt"] for r in row_records]
            rewards = self.rewards.score(RewardBatch(prompts=prompts, completions=completions,
                                                     completion_ids=rollout.completion_ids,
                                                     columns=columns_of(row_records, 1), context=self.context()))
        return Generation(prompts=prompts, completions=completions,
                          prompt_ids=[p for p, c in zip(prompt_ids, counts, strict=True) for _ in range(c)],
                          completion_ids=rollout.completion_ids, finish_reasons=list(rollout.finish_reasons),
                          rewards=rewards, sampler_entropies=(rollout.sampler_entropies
                                                              or [None] * len(rollout.completion_ids)))

    def _dynamic_sampling(self, state: RunPosition, sampled: list[Generation],
                          need: int) -> tuple[Generation, dict[str, float]]:
        """Keep groups with reward spread; refill from fresh prompts; top up with silent groups if rounds run out."""
        g = self.cfg.num_generations
        kept: list[Generation] = []
        spare: list[Generation] = []
        rounds = dropped = regenerated = 0
        oversampled = len(sampled[0].completion_ids) // g - need  # the first draw's groups beyond the batch
        while True:
            _, _, zero_spread = group_stats(self.totals(sampled[-1].rewards), g)
            kept.append(sampled[-1].groups((~zero_spread).nonzero().flatten().tolist(), g))
            spare.append(sampled[-1].groups(zero_spread.nonzero().flatten().tolist(), g))
            dropped += int(zero_spread.sum())
            have = sum(len(k.completion_ids) for k in kept) // g
            if have >= need or rounds >= self.cfg.max_resample_rounds:
                break
            rounds += 1
            regenerated += need - have  # at most need x max_resample_rounds groups on top of the first draw
            sampled.append(self.sample_groups(state, need - have))
        batch = Generation.concat(kept + spare)  # silent groups last: used only if the kept ones fall short
        filled = max(0, need - have)
        if filled:
            log.warning("dynamic sampling: %d of %d groups still had zero reward spread after %d refill round(s); "
                        "they fill the batch with advantage 0 (raise max_resample_rounds, or the task is too easy "
                        "or too hard for the model)", filled, need, rounds)
        batch = batch.groups(list(range(need)), g)
        return batch, {"dynamic_sampling/dropped_groups": float(dropped), "dynamic_sampling/rounds": float(rounds),
                       "dynamic_sampling/regenerated_groups": float(regenerated),
                       "dynamic_sampling/oversampled_groups": float(oversampled),
                       "dynamic_sampling/surplus_groups": float(max(0, have - need)),
                       "dynamic_sampling/zero_spread_groups_kept": float(filled)}

    # -- what a generation tells ---------------------------------------------------------------
    def metrics(self, collected: Collected) -> dict[str, float]:
        """Reward and length statistics over everything sampled (dropped groups included), dynamic sampling's counts;
        takes the reward runner's metrics since the last call."""
        sampled, g = collected.sampled, self.cfg.num_generations
        m = generation_metrics(self.totals(sampled.rewards), sampled.rewards, self.reward_names,
                               sampled.completion_ids, sampled.finish_reasons, g)
        m["completions/frac_identical_in_group"] = identical_fraction(sampled.completion_ids, g)
        m.update(self.rewards.pop_metrics())
        generated = sum(len(c) for c in sampled.completion_ids)
        m["tokens_per_second"] = generated / max(self.timers.totals.get("generate", 0.0), 1e-9)
        return {**m, **collected.metrics}

    def log_completions(self, step: int, batch: Generation, advantages: torch.Tensor,
                        echo: Callable[[str], None]) -> None:
        """Write the generation's completions when one of the optimizer steps it makes, starting after `step`, is a
        multiple of log_completions_steps. Every process holds the whole generation: the main one writes it."""
        cfg, every = self.cfg, self.cfg.log_completions_steps
        if every and self.procs.is_main and (step + cfg.optimizer_steps_per_generation) // every > step // every:
            runlog.log_completions(cfg.output_dir, step + 1, batch.prompts, batch.completions, self.reward_names,
                                   batch.rewards, advantages, batch.finish_reasons, echo=echo,
                                   total_rewards=self.totals(batch.rewards))
