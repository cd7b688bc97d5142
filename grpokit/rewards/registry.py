"""Built-in reward names -> 'module:attribute', imported only when a config names them.

An attribute is either a reward function or a reward class (constructed with the `args` of its
`reward_funcs` entry). Heavy dependencies (math-verify, transformers models, HTTP clients) stay
unimported until their reward is used.
"""

from __future__ import annotations

from typing import Any

BUILTIN_REWARDS: dict[str, str] = {
    "number_correct": "grpokit.rewards.builtin:number_correct",
    "answer_format": "grpokit.rewards.text:AnswerFormat",
    "think_format": "grpokit.rewards.text:ThinkFormat",
    "length": "grpokit.rewards.text:Length",
    "soft_overlong_punishment": "grpokit.rewards.text:SoftOverlongPunishment",
    "repetition_penalty": "grpokit.rewards.text:RepetitionPenalty",
    "math_accuracy": "grpokit.rewards.verifiers:math_accuracy",
    "gec_f1": "grpokit.rewards.gec:gec_f1",
    "heuristic_math_qa": "grpokit.rewards.heuristic:heuristic_math_qa",
    "code_tests": "grpokit.rewards.code:CodeTests",
    "llm_judge": "grpokit.rewards.judge:LLMJudge",
    "reward_model": "grpokit.rewards.model_rewards:ClassifierReward",
    "semantic_similarity": "grpokit.rewards.model_rewards:SemanticSimilarity",
    "reasoning_gym": "grpokit.rewards.gym:reasoning_gym",
}


def reward_name(entry: Any) -> str:
    """The name a reward is logged under (`rewards/{name}/mean`): `name:`, the built-in, or the attribute."""
    if hasattr(entry, "model_dump"):  # the config's RewardEntry
        entry = entry.model_dump(exclude_none=True)
    if isinstance(entry, dict):
        return entry.get("name") or reward_name(entry.get("func", ""))
    if isinstance(entry, str):
        if entry in BUILTIN_REWARDS:
            return entry
        return entry.rpartition(":")[2] if ":" in entry else entry.rpartition(".")[2]
    named = getattr(entry, "name", None)
    return named if isinstance(named, str) else getattr(entry, "__name__", None) or type(entry).__name__
