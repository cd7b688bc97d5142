"""`reasoning_gym`: score completions with the reasoning-gym generator's own `score_answer`.

Rows come from the `reasoning_gym:<task>` dataset, whose `metadata` column (a JSON string) names
the generator (`source_dataset`). The answer is taken from the last `<answer>...</answer>` block
(reasoning-gym's convention), else the last 'Answer: ...' line, else the whole stripped text.
"""

from __future__ import annotations

import json
import re

from grpokit.rewards.builtin import completion_text

_ANSWER_LINE = re.compile(r"answer\s*[:=]\s*(.+)", re.IGNORECASE)


def extract_gym_answer(text: str) -> str:
    from reasoning_gym.utils import extract_answer

    tagged = extract_answer(text)
    if tagged is not None:
        return tagged
    lines = _ANSWER_LINE.findall(text)
    return lines[-1].strip() if lines else text.strip()


def reasoning_gym(completions: list, answer: list, metadata: list, **kwargs) -> list[float]:
    import reasoning_gym as rg

    scores = []
    for completion, row_answer, row_metadata in zip(completions, answer, metadata, strict=True):
        meta = json.loads(row_metadata)
        entry = {"question": "", "answer": row_answer, "metadata": meta}
        score_answer = rg.get_score_answer_fn(meta["source_dataset"])
        scores.append(float(score_answer(extract_gym_answer(completion_text(completion)), entry)))
    return scores
