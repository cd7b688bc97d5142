"""Grammar error correction reward: F1 of the completion's edits against the reference's edits.

An edit is a word-level change to the source: `Edit(start, end, text)` replaces source tokens
[start, end) with `text` (tokens joined by one space; '' for a deletion, start == end for an
insertion). Edits come from difflib.SequenceMatcher over tokens, source -> text. Tokens are words
(apostrophes kept inside: "don't") and single punctuation marks, so adding a comma is one edit.

With H the completion's edits and G the reference's (source -> target):
precision = |H & G| / |H|, recall = |H & G| / |G|, F_beta = (1 + b^2) P R / (b^2 P + R).
As in the M2/ERRANT scorers, precision is 1 when no edit was made and recall is 1 when none was
needed, so: no edit needed and none made -> 1.0; edits made where none were needed -> 0.0;
needed edits left out -> 0.0. `beta` defaults to 1 (F1); GEC papers report F0.5 (`args: {beta: 0.5}`).

Departure from full GEC scorers: edits match only when span and text are identical (no ERRANT
merging or classification), so two correct but differently aligned edits count as a miss.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from grpokit.rewards.builtin import completion_text

_TOKEN = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
_TARGET_COLUMNS = ("target", "correction", "reference")


@dataclass(frozen=True, slots=True)
class Edit:
    start: int  # source token index
    end: int
    text: str


@dataclass(frozen=True, slots=True)
class EditScores:
    precision: float
    recall: float
    f: float


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def extract_edits(source: str, text: str) -> set[Edit]:
    """The word-level edits that turn `source` into `text`."""
    src, out = tokenize(source), tokenize(text)
    matcher = difflib.SequenceMatcher(a=src, b=out, autojunk=False)  # autojunk drops common words in long texts
    return {Edit(i1, i2, " ".join(out[j1:j2])) for op, i1, i2, j1, j2 in matcher.get_opcodes() if op != "equal"}


def edit_scores(source: str, hypothesis: str, target: str, beta: float = 1.0) -> EditScores:
    """Precision, recall and F_beta of hypothesis's edits against target's (corner cases: module docstring)."""
    hyp, gold = extract_edits(source, hypothesis), extract_edits(source, target)
    hits = len(hyp & gold)
    precision = hits / len(hyp) if hyp else 1.0
    recall = hits / len(gold) if gold else 1.0
    b2 = beta * beta
    f = (1 + b2) * precision * recall / (b2 * precision + recall) if precision + recall else 0.0
    return EditScores(precision=precision, recall=recall, f=f)


def _prompt_text(prompt) -> str:
    """A plain prompt, or the last user message of a chat prompt."""
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1].get("content", "")) if users else completion_text(prompt)
    return str(prompt)


def gec_f1(completions: list, source: list | None = None, target: list | None = None, prompts: list | None = None,
           beta: float = 1.0, **kwargs) -> list[float | None]:
    """F_beta (default F1) of the completion's edits to `source` against the `target` correction's edits.

    `source` is the erroneous text; without a `source` column the prompt's text is the source (so
    the prompt must be the sentence alone, with any instruction in the system message). The
    correction comes from `target`, `correction` or `reference`. None where a row has no target.
    """
    if beta <= 0:
        raise ValueError(f"gec_f1: beta must be > 0 (1 for F1, 0.5 for F0.5), got {beta}")
    if target is None:
        target = next((kwargs[k] for k in _TARGET_COLUMNS[1:] if kwargs.get(k) is not None), None)
    if target is None:
        raise ValueError(f"gec_f1 needs the corrected text in a dataset column named one of {list(_TARGET_COLUMNS)}")
    if source is None:
        if prompts is None:
            raise ValueError("gec_f1 needs the erroneous text in a 'source' column (or as the prompt)")
        source = [_prompt_text(p) for p in prompts]
    scores: list[float | None] = []
    for completion, src, tgt in zip(completions, source, target, strict=True):
        if tgt is None or src is None:
            scores.append(None)
            continue
        scores.append(edit_scores(str(src), completion_text(completion), str(tgt), beta).f)
    return scores
