"""grpokit's own calls into transformers, peft and torch use their current APIs: a training step (sampler, log-probs
with the shared prompt forward and with gradient checkpointing, LoRA, the update) in which any DeprecationWarning or
FutureWarning raised while grpokit's code is on the stack fails the test, so the next deprecation shows in CI."""

import traceback
import warnings
from pathlib import Path

import pytest

import grpokit
from grpokit.config import GRPOConfig
from tests.conftest import write_jsonl

GRPOKIT_DIR = str(Path(grpokit.__file__).resolve().parent)
LIBRARY_PLUMBING = ("/torch/nn/modules/", "/transformers/utils/")  # how a call reaches the API, not the API


@pytest.mark.parametrize("settings", [{"gradient_checkpointing": False, "share_prompt_forward": True},
                                      {"gradient_checkpointing": True, "use_peft": True, "beta": 0.1}],
                         ids=["shared-prompt-cache", "checkpointing-lora"])
def test_a_training_step_makes_no_deprecated_call(tmp_path, tiny_model_dir, monkeypatch, settings):
    from grpokit.train.trainer import Trainer

    caught: list[str] = []
    real_warn = warnings.warn

    def warn(message, category=None, stacklevel=1, source=None, **kwargs):
        kind = category or (type(message) if isinstance(message, Warning) else UserWarning)
        if issubclass(kind, (DeprecationWarning, FutureWarning)):
            stack = traceback.extract_stack()[:-1]
            ours = [i for i, f in enumerate(stack) if f.filename.startswith(GRPOKIT_DIR)]
            # grpokit's own call: between its frame and the warning only torch's module call machinery,
            # transformers' decorators and the deprecated API itself (not a library's own deprecated call,
            # such as peft's inside get_peft_model)
            between = [f for f in stack[ours[-1] + 1:] if not any(part in f.filename for part in LIBRARY_PLUMBING)] \
                if ours else None
            if ours and len(between) <= 1:
                frame = stack[ours[-1]]
                caught.append(f"{kind.__name__}: {message} (from {frame.filename}:{frame.lineno})")
        return real_warn(message, category, stacklevel + 1, source, **kwargs)

    monkeypatch.setattr(warnings, "warn", warn)
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"What is {a} + 1?", "answer": str(a + 1)} for a in range(4)])
    cfg = GRPOConfig(model=str(tiny_model_dir), dataset=str(tmp_path / "train.jsonl"),
                     output_dir=str(tmp_path / "run"), reward_funcs=["number_correct"], num_generations=4,
                     per_device_train_batch_size=8, max_completion_length=6, max_steps=1, device="cpu",
                     report_to="none", **settings)
    Trainer(cfg).train()
    assert (tmp_path / "run" / "final_model").is_dir()
    assert not caught, "\n".join(caught)
