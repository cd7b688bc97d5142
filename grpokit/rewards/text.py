"""Rewards on the form of a completion: its format, length and repetition.

Each is a class configured by the `args:` of its `reward_funcs` entry and called like a reward
function. Weight format rewards well below correctness: with group-scaled advantages, a group that
differs only in format gets full-size advantages (README: a loose format reward was hacked in the
demo, entropy fell from 0.8 to 0.3 and held-out accuracy reached 29% instead of 47%).

Departures and choices:
  - `ThinkFormat` asks for DeepSeek-R1's output form, one non-empty `<think>` block and then a
    non-empty answer, not R1-Zero's `<answer>` tags (pass a pattern for those, see its docstring).
  - `Length` falls off linearly and relatively: 0 at length 0 below the range, 0 at twice the
    maximum above it, 0 at 0 and at twice the target.
  - `SoftOverlongPunishment` (DAPO) defaults its cache to a fifth of the maximum, DAPO's
    4096 of 20480.
  - `RepetitionPenalty` (as in open-r1) also counts in tokens or characters, not just words.
"""

from __future__ import annotations

import re
from typing import Literal

from grpokit.rewards.builtin import completion_text

# The last line is 'Answer: <number>' ('**Answer:** 7' and a final '.' allowed), the form the built-in
# task's system prompt asks for. A looser rule (any trailing number) was hacked in the demo.
FINAL_ANSWER_LINE = r"(?i)(?:^|\n)\s*\**answer\s*[:=]\s*\**\s*-?\d[\d,]*(?:\.\d+)?\s*\**\.?\s*$"

# One <think> block with some reasoning, then some answer text, and no other think tags. Each part is
# '\s* first-visible-char rest*', which matches in linear time (no nested ambiguity to backtrack over).
THINK_THEN_ANSWER = (r"(?s)\A<think>\s*(?!</?think>)\S(?:(?!</?think>).)*</think>"
                     r"\s*(?!</?think>)\S(?:(?!</?think>).)*\Z")

Unit = Literal["tokens", "words", "chars"]
_UNITS = ("tokens", "words", "chars")


def _check_unit(reward: str, unit: str) -> None:
    if unit not in _UNITS:
        raise ValueError(f"{reward}: unit must be one of {list(_UNITS)}, got {unit!r}")


def _units(reward: str, unit: str, completions: list, completion_ids: list | None, *, lower: bool = False) -> list:
    """Each completion as a sequence of units: token ids, white-space words, or characters."""
    if unit == "tokens":
        if completion_ids is None:
            raise ValueError(f"{reward}: unit 'tokens' needs completion_ids; the runner passes them, "
                             "a direct call must too")
        return [list(ids) for ids in completion_ids]
    texts = [completion_text(c).lower() if lower else completion_text(c) for c in completions]
    return [t.split() if unit == "words" else t for t in texts]


class _RegexFormat:
    """1.0 when `pattern` is found (re.search) in the stripped completion text, else 0.0."""

    reward_name = "format"  # no isolation = "inline": a user's pattern can backtrack for minutes; workers time out

    def __init__(self, *, pattern: str) -> None:
        try:
            self.pattern = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{self.reward_name}: pattern {pattern!r} is not a valid regular expression: "
                             f"{exc}") from None

    def __call__(self, completions: list, **kwargs) -> list[float]:
        return [1.0 if self.pattern.search(completion_text(c).strip()) else 0.0 for c in completions]


class AnswerFormat(_RegexFormat):
    """1.0 when the completion matches `pattern` (re.search on the stripped text), else 0.0.

    Default: the last line is 'Answer: <number>'; bold ('**Answer:** 7') and a final '.' allowed.
    """

    reward_name = "answer_format"

    def __init__(self, *, pattern: str = FINAL_ANSWER_LINE) -> None:
        super().__init__(pattern=pattern)


class ThinkFormat(_RegexFormat):
    """1.0 for '<think>reasoning</think> answer' (DeepSeek-R1's form), else 0.0.

    Default: the stripped completion opens with `<think>`, holds exactly one non-empty think block,
    and has non-empty text after `</think>`. For R1-Zero's tags pass e.g.
    `pattern: '(?s)\\A<think>.+?</think>\\s*<answer>.+?</answer>\\Z'`. When the chat template
    already opens `<think>` in the prompt, the completion starts inside the block: pass
    `pattern: '(?s)\\A(?:(?!</?think>).)+</think>\\s*\\S'`.
    """

    reward_name = "think_format"

    def __init__(self, *, pattern: str = THINK_THEN_ANSWER) -> None:
        super().__init__(pattern=pattern)


class Length:
    """A length reward in [0, 1], counted in `unit` ('tokens', 'words' or 'chars').

    Either a range, `min_length` and/or `max_length`: 1.0 inside it; below it 1 - (min - n) / min
    (0 at length 0); above it 1 - (n - max) / max (0 at twice max). Or a `target`:
    1 - |n - target| / target, clipped at 0. Give a target or a range, not both.
    """

    isolation = "inline"

    def __init__(self, *, target: int | None = None, min_length: int | None = None, max_length: int | None = None,
                 unit: Unit = "tokens") -> None:
        _check_unit("length", unit)
        if target is None and min_length is None and max_length is None:
            raise ValueError("length: give a target (e.g. target: 200) or a range (min_length and/or max_length)")
        if target is not None and (min_length is not None or max_length is not None):
            raise ValueError("length: give either target or min_length/max_length, not both")
        if target is not None and target <= 0:
            raise ValueError(f"length: target must be > 0, got {target}")
        if (min_length is not None and min_length < 0) or (max_length is not None and max_length <= 0):
            raise ValueError(f"length: need min_length >= 0 and max_length > 0, got {min_length} and {max_length}")
        if min_length is not None and max_length is not None and min_length > max_length:
            raise ValueError(f"length: min_length ({min_length}) is above max_length ({max_length})")
        self.target, self.min_length, self.max_length, self.unit = target, min_length, max_length, unit

    def score(self, n: int) -> float:
        if self.target is not None:
            return max(0.0, 1.0 - abs(n - self.target) / self.target)
        if self.min_length is not None and n < self.min_length:
            return 1.0 - (self.min_length - n) / self.min_length
        if self.max_length is not None and n > self.max_length:
            return max(0.0, 1.0 - (n - self.max_length) / self.max_length)
        return 1.0

    def __call__(self, completions: list, completion_ids: list | None = None, **kwargs) -> list[float]:
        return [self.score(len(units)) for units in _units("length", self.unit, completions, completion_ids)]


class SoftOverlongPunishment:
    """DAPO's soft overlong punishment on the completion's token count n = len(completion_ids).

    0 while n <= max_length - cache_length, then linear down to -1 at n = max_length, and -1 beyond.
    `max_length` defaults to the run's `max_completion_length`; `cache_length` to max_length // 5.
    """

    isolation = "inline"

    def __init__(self, *, max_length: int | None = None, cache_length: int | None = None) -> None:
        if max_length is not None and max_length <= 0:
            raise ValueError(f"soft_overlong_punishment: max_length must be > 0, got {max_length}")
        if cache_length is not None and (cache_length <= 0 or max_length is not None and cache_length > max_length):
            raise ValueError(f"soft_overlong_punishment: cache_length must be in (0, max_length], got {cache_length} "
                             f"with max_length {max_length}")
        self.max_length, self.cache_length = max_length, cache_length

    def __call__(self, completions: list, completion_ids: list, max_completion_length: int | None = None,
                 **kwargs) -> list[float]:
        max_length = self.max_length or max_completion_length
        if max_length is None:
            raise ValueError("soft_overlong_punishment: no max_length in its args and no max_completion_length "
                             "from the run")
        cache_length = self.cache_length or max(1, max_length // 5)
        if cache_length > max_length:
            raise ValueError(f"soft_overlong_punishment: cache_length {cache_length} exceeds max_length {max_length}")
        safe = max_length - cache_length
        return [0.0 if len(ids) <= safe else max(-1.0, (safe - len(ids)) / cache_length) for ids in completion_ids]


class RepetitionPenalty:
    """-(repeated n-grams / all n-grams) scaled to [max_penalty, 0], as in open-r1.

    A repeated n-gram is one seen before in the same completion, so the value is
    max_penalty * (1 - distinct / total). Text is lower-cased (as in open-r1); words are split on
    white space. 0 for completions with fewer than `ngram_size` units.
    """

    isolation = "inline"

    def __init__(self, *, ngram_size: int = 3, max_penalty: float = -1.0, unit: Unit = "words") -> None:
        _check_unit("repetition_penalty", unit)
        if ngram_size < 1:
            raise ValueError(f"repetition_penalty: ngram_size must be >= 1, got {ngram_size}")
        if max_penalty > 0:
            raise ValueError(f"repetition_penalty: max_penalty must be <= 0 (it is a penalty), got {max_penalty}")
        self.ngram_size, self.max_penalty, self.unit = ngram_size, max_penalty, unit

    def score(self, units) -> float:
        n = self.ngram_size
        ngrams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
        repeated = len(ngrams) - len(set(ngrams))
        return self.max_penalty * repeated / len(ngrams) if repeated else 0.0

    def __call__(self, completions: list, completion_ids: list | None = None, **kwargs) -> list[float]:
        return [self.score(units) for units in _units("repetition_penalty", self.unit, completions, completion_ids,
                                                       lower=True)]
