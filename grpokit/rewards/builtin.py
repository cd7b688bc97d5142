"""Built-in reward for tasks whose answer is a number, and helpers the other built-ins share.

`number_correct` parses the completion's final answer: the last 'Answer: N' line when there is
one, else the last number in the text. The format reward for that 'Answer: N' line is
`answer_format` (text.py:AnswerFormat); math-verify equivalence is `math_accuracy` (verifiers.py).
"""

from __future__ import annotations

import math
import re
from typing import Any

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_ANSWER_LINE = re.compile(rf"answer\s*[:=]\s*\**\s*({_NUMBER})", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)
_GSM8K_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")  # GSM8K's reference solutions end '#### 72'


def completion_text(completion: Any) -> str:
    """Text of a completion, whether plain or a list of chat messages (TRL's conversational form)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"completion must be a string or a list of messages, got {type(completion).__name__}")


def _to_number(text: str) -> float | None:
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def extract_final_number(text: str) -> float | None:
    """The answer a completion commits to: its last 'Answer: N', else its last number, else None."""
    marked = _ANSWER_LINE.findall(text)
    if marked:
        return _to_number(marked[-1])
    numbers = _ANY_NUMBER.findall(text)
    return _to_number(numbers[-1]) if numbers else None


def gsm8k_final(reference: str) -> str | None:
    """The number after a reference's last GSM8K '####' mark, as written; None without one."""
    marked = _GSM8K_FINAL.findall(reference)
    return marked[-1] if marked else None


def number_correct(completions: list, answer: list, **kwargs) -> list[float | None]:
    """1.0 when the completion's final number equals the `answer` column, else 0.0.

    The reference is a number (`72`, `1,234.5`) or a GSM8K solution ending '#### 72' (the `answer` column of
    openai/gsm8k as published). None (not applicable) where it is neither.
    """
    scores: list[float | None] = []
    for completion, reference in zip(completions, answer, strict=True):
        text = str(reference)
        final = gsm8k_final(text)
        expected = _to_number(final if final is not None else text.strip())
        if expected is None:
            scores.append(None)
            continue
        got = extract_final_number(completion_text(completion))
        scores.append(1.0 if got is not None and abs(got - expected) < 1e-9 else 0.0)
    return scores
