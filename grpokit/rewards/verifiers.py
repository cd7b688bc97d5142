"""Verifier rewards: is the completion's final answer equal to the reference?

`math_accuracy` finds the answer a completion commits to with its own, documented rules (below),
then lets math-verify decide equivalence, so `1/2`, `0.5`, `\\frac12` and `\\frac{1}{2}` agree,
and `1,234`, `$1,234` and `1234.00` equal `1234`.

Which text is the answer:
  - reference (`answer` or `solution` column): the last `\\boxed{...}` if there is one, else the
    text after the last GSM8K `####`, else the whole value (`72`, `\\frac{1}{2}`);
  - completion: the last complete `\\boxed{...}` (nested braces matched; a box cut off by the
    length limit does not count), else the last `#### N`, else the last 'Answer: N' / 'answer is N'
    marker whose text holds a number or LaTeX, else the last number or inline LaTeX math
    (`$...$` holding a LaTeX command, or `\\(...\\)`) in the text.
  A span that starts with a number is cut to that number, so '72 dollars because ...' is 72.

Departures from math-verify's own usage:
  - its timeouts (`signal.alarm`) are disabled (`parsing_timeout=None`, `timeout_seconds=None`):
    they raise outside the main thread, and the reward runner already enforces a per-call timeout
    from a killable worker process. math-verify's one-time warning about this is filtered out.
  - extraction is ours, not math-verify's anchors, so the `####` form and the order above hold.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from grpokit.rewards.builtin import completion_text

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GSM8K_MARK = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_MARK = re.compile(r"answer(?:\s+is\b\s*:?|\s*[:=])[\s*]*([^\n]*)", re.IGNORECASE)
# One number as people write it: -1,234.50, $72, 1/2, 45%. Thousands groups are tried first.
_NUMBER = re.compile(r"-?(?:\\?\$\s?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+)?(?:\s?\\?%)?")
# Inline math with a LaTeX command in it; a plain '$5 and $6' is currency, not math.
_INLINE_MATH = re.compile(r"\$(?=[^$\n]*\\)[^$\n]+\$|\\\(.+?\\\)")
_LAST_RESORT = re.compile(f"{_INLINE_MATH.pattern}|{_NUMBER.pattern}")
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_PROSE = re.compile(r"[A-Za-z]{2,}\s+[A-Za-z]{2,}")


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (nested braces matched), or None.

    One pass pairs every brace, so a text full of unclosed boxes costs linear time, not quadratic.
    """
    content_start = {m.end() - 1: m.end() for m in _BOXED.finditer(text)}  # a box's '{' -> its content
    if not content_start:
        return None
    closing, open_braces = {}, []
    for i, char in enumerate(text):
        if char == "{":
            open_braces.append(i)
        elif char == "}" and open_braces:
            closing[open_braces.pop()] = i
    complete = [(start, closing[brace]) for brace, start in content_start.items() if brace in closing]
    if not complete:
        return None
    start, end = max(complete)
    return text[start:end]


def _leading_value(span: str) -> str | None:
    """The value a marker line gives: its leading number, else the span up to the sentence's end.

    None for prose without math ('The answer is clear.'), so the next rule gets its turn.
    """
    span = span.strip().strip("*").strip()
    number = _NUMBER.match(span)
    if number:
        return number.group()
    span = _SENTENCE_END.split(span, maxsplit=1)[0].strip()
    if not span or ("\\" not in span and (not re.search(r"\d", span) or _PROSE.search(span))):
        return None
    return span


def reference_answer(reference: str) -> str:
    """The answer text of a reference: last `\\boxed{}`, else after the last `####`, else all of it."""
    boxed = last_boxed(reference)
    if boxed is not None:
        return boxed
    marks = _GSM8K_MARK.findall(reference)
    return (marks[-1] if marks else reference).strip()


def completion_answer(text: str) -> str | None:
    """The answer text a completion commits to (rules in the module docstring), or None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for marker in (_GSM8K_MARK, _ANSWER_MARK):
        for span in reversed(marker.findall(text)):
            value = _leading_value(span)
            if value is not None:
                return value
    values = _LAST_RESORT.findall(text)
    return values[-1] if values else None


def _math_value(answer: str) -> list[Any]:
    """math-verify's parse of an answer span as LaTeX; [] when nothing parses to a math object."""
    from math_verify import LatexExtractionConfig, parse

    value = answer.strip().rstrip(".").strip()
    if value.startswith("\\(") and value.endswith("\\)"):
        value = value[2:-2]
    if _NUMBER.fullmatch(value):
        # a plain number: no currency sign; '%' is a comment in LaTeX, so escape it
        value = value.replace("\\$", "").replace("$", "").replace(" ", "").replace("\\%", "%").replace("%", "\\%")
    elif _PROSE.search(value) and "\\" not in value:
        return []  # a sentence, not a value: LaTeX parsing would read it as a product of symbols
    value = value.strip("$").strip()
    if not value:
        return []
    # Timeouts off (None): math-verify's signal.alarm fails outside the main thread; the runner times calls out.
    parsed = parse(f"${value}$", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)
    return [p for p in parsed if not isinstance(p, str)]  # drop the raw-string fallback


def _equal(gold: list[Any], predicted: list[Any]) -> bool:
    from math_verify import verify

    return verify(gold, predicted, timeout_seconds=None)


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once per process that its timeout is off; here that is deliberate."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


_QUIET = _DropTimeoutDisabledWarning()


def _quiet_math_verify() -> None:
    for name in ("math_verify.parser", "math_verify.grader"):
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)


def math_accuracy(completions: list, answer: list | None = None, solution: list | None = None,
                  **kwargs) -> list[float | None]:
    """1.0 when the completion's final answer is mathematically equal to the reference, else 0.0.

    The reference comes from `answer` (GSM8K '... #### 72', or a bare value) or, without one, from
    `solution` (a worked solution with `\\boxed{}`). None (not applicable) where the reference
    cannot be parsed.
    """
    references = answer if answer is not None else solution
    if references is None:
        raise ValueError("math_accuracy needs the reference in a dataset column named 'answer' "
                         "(GSM8K '#### N' or a bare value) or 'solution' (with \\boxed{}); neither was given")
    _quiet_math_verify()
    gold_by_reference: dict[str, list[Any]] = {}  # a group's completions share one reference
    scores: list[float | None] = []
    for completion, reference in zip(completions, references, strict=True):
        key = "" if reference is None else str(reference)
        if key not in gold_by_reference:
            gold_by_reference[key] = _math_value(reference_answer(key))
        gold = gold_by_reference[key]
        if not gold:
            scores.append(None)
            continue
        predicted = completion_answer(completion_text(completion))
        value = _math_value(predicted) if predicted is not None else []
        scores.append(1.0 if value and _equal(gold, value) else 0.0)
    return scores
