"""The GRPO loop's own state: what a checkpoint keeps of it, so that a resumed run goes on exactly where it stopped.

The best-model keeper, the health monitor and the reward runner keep their own state beside it (each has
state() / restore()); checkpoint.py writes all of them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from grpokit.algo.batches import Pending


@dataclass(slots=True, kw_only=True)
class TrainState:
    """Where the loop is: what trainer_state.json, rng_state.pt ("order") and pending.pt keep of it."""

    global_step: int = 0  # optimizer steps taken (skipped ones included)
    generations: int = 0  # sampler calls so far; seeds each one's sampler, so a run is reproducible
    num_tokens: int = 0  # prompt + completion tokens sampled so far, every process's
    order: list[int] = field(default_factory=list)  # the rest of the current pass over the prompts, popped from the end
    order_rng: random.Random  # shuffles each pass's order
    consecutive_skips: int = 0  # non-finite optimizer steps in a row
    eval_before: dict[str, float] | None = None  # the held-out result before training (eval_on_start)
    train_seconds: float = 0.0  # time spent in optimizer steps so far (max_train_seconds' budget)
    trackers: dict[str, str] = field(default_factory=dict)  # report_to trackers' run ids: a resume continues them
    temperature: float | None = None  # the sampling temperature on_collapse adapt raised to (None: the config's)
    temperature_raised_at: int | None = None  # the step of its last raise
    pending: Pending | None = None  # the current generation's micro-batches not yet trained on

    @classmethod
    def start(cls, seed: int) -> TrainState:
        """The state before the first step of a run with `seed`."""
        return cls(order_rng=random.Random(seed))

    def next_prompts(self, count: int, num_prompts: int) -> list[int]:
        """The next `count` of `num_prompts` prompt indices: each pass is a fresh shuffle, taken from its end."""
        picked = []
        while len(picked) < count:
            if not self.order:
                self.order = list(range(num_prompts))
                self.order_rng.shuffle(self.order)
            picked.append(self.order.pop())
        return picked
