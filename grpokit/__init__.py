"""grpokit: GRPO fine-tuning for causal language models."""

__version__ = "0.1.0"

# imported on first use: `grpokit --help` stays fast
_LAZY = {"per_sample": "grpokit.rewards.contract", "GRPOConfig": "grpokit.api", "GRPOTrainer": "grpokit.api",
         "RewardSpec": "grpokit.rewards.spec", "RewardModel": "grpokit.rewards.spec"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'grpokit' has no attribute '{name}'")
