"""The generation-engine contract: token ids in, a `Rollout` of token ids and log-probs out.

Engines take already-tokenised prompts, so every engine sees exactly the ids the trainer later
scores; no engine-specific type leaves an engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:  # only for the Engine protocol's annotation: `grpokit --help` does not import torch
    import torch

FinishReason = Literal["stop", "length"]


@dataclass(slots=True, kw_only=True)
class SamplingParams:
    """Sampling settings, applied in transformers' order: repetition penalty, temperature, top-k, top-p, min-p."""

    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # 1 disables nucleus filtering
    top_k: int = 0  # 0 disables top-k
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max; 0 disables
    repetition_penalty: float = 1.0  # transformers' semantics over prompt + completion tokens; 1 disables
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings, matched in the decoded completion text
    seed: int | None = None
    entropies: bool = False  # also return each sampled token's entropy (engines that cannot return None)


@dataclass(slots=True, kw_only=True)
class Rollout:
    """Completions for B prompts x n samples, ordered prompt-major: row i belongs to prompt i // n."""

    completion_ids: list[list[int]]  # [B*n][T_i], the stop token included when one was sampled
    sampler_logps: list[list[float]]  # [B*n][T_i], log-prob of each sampled token under the sampler
    finish_reasons: list[FinishReason]  # [B*n]
    group_size: int
    # [B*n][T_i] with SamplingParams.entropies: the entropy of the distribution each token's log-prob is under
    # (logits / temperature, before penalty and filters: the trainer's); None when not asked or not available
    sampler_entropies: list[list[float]] | None = None


class Engine(Protocol):
    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> Rollout: ...

    def load_weights(self, model: torch.nn.Module) -> None: ...

    def close(self) -> None: ...
