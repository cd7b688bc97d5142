"""The model passes of a step: the log-probs a micro-batch needs, and the optimizer step over one window.

Old log-probs are computed once per generation when the policy moves before a micro-batch is used
(`GRPOConfig.policy_moves`); otherwise the detached policy log-probs stand in (the ratio is then exactly 1
and only its gradient matters). Reference log-probs come from a frozen copy of the starting policy, or
with LoRA from the same model with its adapters off, and only when `beta > 0`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from grpokit.algo.batches import Generation, MicroBatch, make_micro_batch, plan_micro_batches
from grpokit.algo.loss import LossSettings, StepTotals, grpo_loss
from grpokit.config.schema import GRPOConfig
from grpokit.errors import TrainingError
from grpokit.models.logprobs import completion_logps
from grpokit.runtime.distributed import Processes
from grpokit.train.state import TrainState

log = logging.getLogger(__name__)


def loss_settings(cfg: GRPOConfig) -> LossSettings:
    """The config's loss settings, as the pure loss function takes them."""
    return LossSettings(loss_type=cfg.loss_type, importance_sampling_level=cfg.importance_sampling_level,
                        epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta, beta=cfg.beta,
                        top_entropy_quantile=cfg.top_entropy_quantile, max_completion_length=cfg.max_completion_length)


class LogProbs:
    """Log-probs of a micro-batch's completions: the policy's with autograd for the update (through the
    data-parallel wrapper `train_module` when there is one), and without autograd the old policy's and the
    reference's. `reference`: the frozen copy, or None (beta 0, or LoRA: the adapters are switched off)."""

    def __init__(self, cfg: GRPOConfig, policy, *, reference, uses_adapters: bool, train_module,
                 autocast: Callable[[], AbstractContextManager]):
        self.cfg, self.policy, self.reference, self.uses_adapters = cfg, policy, reference, uses_adapters
        self.train_module, self.autocast = train_module, autocast
        self.temperature = cfg.temperature  # the sampling temperature (on_collapse adapt raises it)

    def of(self, model, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """[M, T] log-probs and entropies of `model` (autograd as the caller has it)."""
        return completion_logps(model, mb.input_ids, mb.attention_mask, mb.completion_mask.shape[1],
                                self.temperature, self.cfg.logprob_chunk_size, self.cfg.share_prompt_forward)

    def train(self, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's log-probs with autograd, through the data-parallel wrapper when there is one."""
        if self.train_module is None:
            return self.of(self.policy, mb)
        return self.train_module(mb.input_ids, mb.attention_mask, mb.completion_mask.shape[1], self.temperature,
                                 self.cfg.logprob_chunk_size, self.cfg.share_prompt_forward)

    def score(self, mb: MicroBatch, policy_moves: bool) -> None:
        """Fill `mb.old_logps` (only when the policy moves before `mb` is used) and `mb.ref_logps` (beta > 0)."""
        with torch.no_grad(), self.autocast():
            if policy_moves:
                mb.old_logps, _ = self.of(self.policy, mb)
            mb.ref_logps = self._reference(mb)

    def _reference(self, mb: MicroBatch) -> torch.Tensor | None:
        if self.cfg.beta == 0:
            return None
        if self.uses_adapters:
            with self.policy.disable_adapter():
                return self.of(self.policy, mb)[0]
        return self.of(self.reference, mb)[0]


def prepare_micro_batches(cfg: GRPOConfig, batch: Generation, advantages: torch.Tensor, *, logprobs: LogProbs,
                          procs: Processes, pad_id: int, device, dtype: torch.dtype) -> list[MicroBatch]:
    """This process's micro-batches of a generation (algo/batches.py's plan), packed, with the log-probs they need."""
    planned = plan_micro_batches([len(c) for c in batch.completion_ids], batch.finish_reasons,
                                 batch_size=cfg.per_device_train_batch_size,
                                 accumulation=cfg.gradient_accumulation_steps, loss_type=cfg.loss_type,
                                 mask_truncated=cfg.mask_truncated_completions, process_index=procs.index,
                                 process_count=procs.count)
    made = []
    for plan in planned:  # each scored as soon as it is packed: the passes run in the order they always did
        mb = make_micro_batch(batch, advantages, plan, pad_id=pad_id, device=device, dtype=dtype,
                              mask_truncated=cfg.mask_truncated_completions)
        logprobs.score(mb, cfg.policy_moves)
        made.append(mb)
    return made


class Updater:
    """One optimizer step over the micro-batches of one accumulation window. A step whose loss or gradient norm
    is not finite is skipped: weights, optimizer state and schedule stay as they were (the caller counts skips)."""

    def __init__(self, cfg: GRPOConfig, policy, *, optimizer, scheduler, logprobs: LogProbs, settings: LossSettings,
                 procs: Processes, train_module, device: torch.device,
                 autocast: Callable[[], AbstractContextManager]):
        self.cfg, self.policy, self.optimizer, self.scheduler = cfg, policy, optimizer, scheduler
        self.logprobs, self.settings, self.procs, self.train_module = logprobs, settings, procs, train_module
        self.device, self.autocast = device, autocast
        self._skip_silent_rows = True  # off only to compare against the unsplit step (tests)

    def split_silent(self, mb: MicroBatch) -> tuple[MicroBatch | None, MicroBatch | None]:
        """(rows to train on, silent rows) of `mb`; either None when it has no such rows. A row whose advantage is
        exactly 0 (its group had no reward spread) adds exactly 0 to the loss and its gradient when beta is 0 and
        every token trains (top_entropy_quantile 1): its backward pass is skipped (`skip_silent_rows`). The loss's
        normalisers are the step's counts (`step_sequences`, `step_tokens`), so the other rows' terms are unchanged.
        With several processes every one runs the same backward passes (DDP's all-reduce): nothing is split."""
        silent = mb.advantages == 0
        if not self.skip_silent_rows or not bool(silent.any()):
            return mb, None
        if bool(silent.all()):
            return None, mb
        return mb.rows((~silent).nonzero().flatten()), mb.rows(silent.nonzero().flatten())

    @property
    def skip_silent_rows(self) -> bool:
        return (self._skip_silent_rows and self.settings.beta == 0 and self.settings.top_entropy_quantile >= 1.0
                and self.procs.count == 1 and self.train_module is None)

    @property
    def uses_sampler_entropy(self) -> bool:
        """Silent rows take their entropy metric from the sampler (`MicroBatch.sampler_entropy`) instead of a forward
        pass: where their backward is skipped and the policy has not moved since it sampled them (one pass, one
        optimizer step per generation), so the sampler's distribution is the one the forward would compute (up to
        rounding: the sampler's products are not the trainer's)."""
        return self.skip_silent_rows and not self.cfg.policy_moves

    def silent_entropy(self, silent: MicroBatch) -> torch.Tensor:
        """[M, T] token entropies of rows that do not train: the sampler's where it gave them and
        `uses_sampler_entropy` holds, else from a forward pass alone."""
        if self.uses_sampler_entropy and silent.sampler_entropy is not None:
            return silent.sampler_entropy
        with torch.no_grad(), self.autocast():
            return self.logprobs.of(self.policy, silent)[1]

    def update(self, window: list[MicroBatch]) -> dict[str, float]:
        """Train on `window`: metrics (token means over the window, every process's), loss, grad_norm, skipped_step."""
        if window[0].step_sequences is None:  # micro-batches from a checkpoint written before the fields existed
            totals = StepTotals(num_sequences=sum(len(mb.advantages) for mb in window),
                                num_tokens=int(sum(mb.completion_mask.sum() for mb in window)))
        else:  # the whole window's, over every process
            totals = StepTotals(num_sequences=window[0].step_sequences, num_tokens=window[0].step_tokens)
        sums: dict[str, torch.Tensor] = {}
        loss_total = torch.zeros((), device=self.device)
        backward_ran = False
        for i, mb in enumerate(window):
            trained, silent = self.split_silent(mb)
            if silent is not None:  # no gradient to give: only their entropy, a metric
                silent_entropy = (self.silent_entropy(silent) * silent.completion_mask).sum()
                sums["entropy"] = sums.get("entropy", 0.0) + silent_entropy
            if trained is None:
                continue
            with self.procs.no_sync(self.train_module, skip=i < len(window) - 1):  # all-reduce on the last one
                with self.autocast():
                    policy_logps, entropy = self.logprobs.train(trained)
                old = trained.old_logps if trained.old_logps is not None else policy_logps.detach()
                loss, metrics = grpo_loss(policy_logps, old, trained.ref_logps, trained.advantages,
                                          trained.completion_mask, self.settings, totals, entropy=entropy)
                self.procs.backward(loss)
                backward_ran = True
            loss_total = loss_total + loss.detach()
            n_tok = trained.completion_mask.sum()
            metrics["entropy"] = (entropy * trained.completion_mask).sum() / n_tok.clamp(min=1)
            for key, value in metrics.items():  # tensors until the end of the step: no device sync per micro-batch
                sums[key] = sums.get(key, 0.0) + value.detach() * n_tok
        for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            sums.setdefault(key, 0.0)  # a silent row is never clipped (the counts need a nonzero advantage)
        if not backward_ran:  # every row silent: zero gradients, so AdamW still takes its (momentum) step as before
            for p in self.policy.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
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
        else:
            self.optimizer.step()
            self.scheduler.step()  # the schedule moves with real updates only
        self.optimizer.zero_grad(set_to_none=True)
        out = {key: float(value) / max(totals.num_tokens, 1) for key, value in sums.items()}
        out.update(loss=loss_total, grad_norm=grad_norm, skipped_step=float(skipped))
        return out


def count_skip(state: TrainState, update: dict[str, float], limit: int) -> bool:
    """Count `update` in `state.consecutive_skips` (a real step resets it); True when `limit` in a row are reached."""
    if not update["skipped_step"]:
        state.consecutive_skips = 0
        return False
    state.consecutive_skips += 1
    log.warning("step %d: non-finite loss (%s) or gradient norm (%s); optimizer step skipped, weights unchanged "
                "(%d in a row, the run stops at %d)", state.global_step, update["loss"], update["grad_norm"],
                state.consecutive_skips, limit)
    return state.consecutive_skips >= limit


def skip_limit_error(state: TrainState, update: dict[str, float], limit: int, saved: Path) -> TrainingError:
    """The error that stops a run after `limit` skipped steps in a row; `saved`: the checkpoint of the last good
    weights."""
    return TrainingError(f"stopped at step {state.global_step}: {limit} optimizer steps in a row had a non-finite loss "
                         f"or gradient norm (last: loss {update['loss']}, grad norm {update['grad_norm']}). The "
                         f"weights are those before the first skipped step, saved in {saved}. Likely causes: a "
                         "learning rate too high, fp16 overflow, or NaN/inf from the model; lower learning_rate or "
                         "max_grad_norm, or use bf16/fp32")
