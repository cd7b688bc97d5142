"""The math-QA trainer's heuristic reward model: a [0, 1] score of a completion against a reference.

score = 0.2 length + 0.3 formulas + 0.3 concepts + 0.2 structure, each part in [0, 1]:
  - length: 1 - |n - m| / m, clipped at 0, with n and m the completion's and reference's word counts;
  - formulas: the fraction of the reference's math items found in the completion: its numbers
    (thousands commas and trailing zeros dropped: '1,234.50' -> '1234.5'), equations (white space
    and '$' removed, numbers as above: 'P(A|B) = P(A)' -> 'P(A|B)=P(A)', '9 * 2 = $18.00' -> '9*2=18')
    and LaTeX commands ('\\frac');
  - concepts: the fraction of the reference's distinct content words (lower-cased, letters only,
    3+ letters, stopwords removed) found among the completion's words;
  - structure: a third each for two or more sentences, two or more non-empty lines (steps laid
    out one a line), and a last sentence that concludes (opens with 'Therefore', 'So', 'Answer:',
    '####', ..., or holds a '\\boxed{}').
A part the reference gives nothing to cover (no math items, no content words) scores 1.

The reward gates that quality score on the final answer, so it cannot be gamed by style: where the
reference commits to a final number (after GSM8K's '####', in a '\\boxed{}' or an 'Answer: N' line, or the
one number of a short reference of at most 6 words: '18', '$18', '5 apples', 'The answer is 18.'), a
completion whose final number (its last 'Answer: N', else its last number) equals it scores 0.55 + 0.45 q,
any other 0.45 q, with q the score above: every right answer ranks above every wrong one, and among either
the better explained ranks higher. A free-text reference (the math-QA trainer's own data: 'Conditional
probability is ...') is scored by q alone, as that trainer defines the reward: its numbers ('for P(B) > 0',
'Chapter 2.4') are not an answer to match, and gating on its last one ranked a bare '0' above a right
explanation. An empty or white-space-only completion scores 0.

Choices the source leaves open: lengths are in words; GSM8K calculator notes `<<9*2=18>>` are
dropped before scoring; matching is exact (no stemming, no synonyms). The reference comes from the
`answer` column (or another reference column, which the runner binds to `answer`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from grpokit.rewards.builtin import _ANSWER_LINE, _to_number, completion_text, extract_final_number, gsm8k_final

WEIGHTS = {"length": 0.2, "formulas": 0.3, "concepts": 0.3, "structure": 0.2}
SHORT_ANSWER_WORDS = 6  # a reference of at most this many words holding one number commits to it
RIGHT_FLOOR, QUALITY_SHARE = 0.55, 0.45  # right: 0.55 + 0.45 q in [0.55, 1]; wrong: 0.45 q in [0, 0.45]

_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")
_BOXED_NUMBER = re.compile(r"\\boxed\{\s*(-?[\d,]*\.?\d+)\s*\}")
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")
# Equations are read by a linear scan over these tokens (a single regex for them backtracks
# quadratically on degenerate text such as ' -a -a -a ...').
_EQUATION_TOKEN = re.compile(r"(?P<operand>(?:[^\s=,;:+\-*/^×÷·]|,(?=\d{3}))+)"  # a comma only in 1,234
                             r"|(?P<link>[-+*/^×÷·=])|(?P<space>\s+)|(?P<other>.)", re.DOTALL)
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[^\W\d_]+")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s+|$)")
_CONCLUSION = re.compile(r"^\W*(?:final answer|answer|therefore|thus|so|hence|in conclusion|in summary)\b"
                         r"|^####|\\boxed", re.IGNORECASE)
STOPWORDS = frozenset("""
about above after again against all also and any are because been before being below between both but
can could did does doing down during each few for from further had has have having her here hers herself
him himself his how into its itself just more most myself nor not now off once only other our ours
ourselves out over own same she should some such than that the their theirs them themselves then there
these they this those through too under until very was were what when where which while who whom why will
with would you your yours yourself yourselves get gets got one use used using let lets may might must
shall every many much well
""".split())


@dataclass(frozen=True, slots=True)
class HeuristicParts:
    length: float
    formulas: float
    concepts: float
    structure: float

    @property
    def total(self) -> float:
        return sum(WEIGHTS[name] * getattr(self, name) for name in WEIGHTS)


def _number_key(number: str) -> str:
    number = number.replace(",", "")
    return number.rstrip("0").rstrip(".") if "." in number else number


def equations(text: str) -> list[str]:
    """Runs 'operand (operator|= operand)*' holding an '=', white space removed: 'x + 1 = 3' -> 'x+1=3'.

    Two operands with only white space between them end a run ('P(B|A) P(A)' is not one term).
    """
    found: list[str] = []
    run: list[str] = []
    end = 0  # run[:end] stops at an operand: an equation cannot end on an operator or '='
    wants_operand = True
    for token in _EQUATION_TOKEN.finditer(text + ";"):  # the ';' closes the last run
        kind, value = token.lastgroup, token.group()
        if kind == "space":
            continue
        is_link = kind == "link" and (not wants_operand or value == "-")  # an operator, '=', or a sign
        if kind == "other" or (kind == "operand" and not wants_operand) or (kind == "link" and not is_link):
            if "=" in run[:end]:
                found.append("".join(run[:end]))
            run, end, wants_operand = [], 0, True
        if kind == "operand":
            run.append(value)
            end, wants_operand = len(run), False
        elif is_link:
            run.append(value)
            wants_operand = True
    return found


def math_items(text: str) -> set[str]:
    """Numbers, equations (white space removed) and LaTeX commands in text."""
    items = {_number_key(n) for n in _NUMBER.findall(text)}
    for equation in equations(text):
        equation = equation.replace("$", "").rstrip(".!?")
        items.add(_NUMBER.sub(lambda m: _number_key(m.group()), equation))
    return items | set(_LATEX_COMMAND.findall(text))


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if len(w) >= 3 and w not in STOPWORDS}


def _covered(wanted: set[str], present: set[str]) -> float:
    return len(wanted & present) / len(wanted) if wanted else 1.0


def length_score(text: str, reference: str) -> float:
    n, m = len(text.split()), len(reference.split())
    return max(0.0, 1.0 - abs(n - m) / m)


def structure_score(text: str) -> float:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    sentences = [s for s in _SENTENCE_END.split(text) if s.strip()]
    last = [s for s in _SENTENCE_END.split(lines[-1]) if s.strip()][-1] if lines else ""
    checks = (len(sentences) >= 2, len(lines) >= 2, bool(_CONCLUSION.search(last.strip())))
    return sum(checks) / len(checks)


def heuristic_parts(text: str, reference: str) -> HeuristicParts:
    text, reference = _CALCULATOR_NOTE.sub("", text), _CALCULATOR_NOTE.sub("", reference)
    return HeuristicParts(length=length_score(text, reference),
                          formulas=_covered(math_items(reference), math_items(text)),
                          concepts=_covered(content_words(reference), set(_WORD.findall(text.lower()))),
                          structure=structure_score(text))


def final_answer(reference: str) -> float | None:
    """The final number a reference commits to: after GSM8K's last '####', else in its last '\\boxed{}' or
    'Answer: N' line, else the one number of a short reference (at most SHORT_ANSWER_WORDS words: '18', '$18', '5
    apples', 'The answer is 18.'); None for free text (module docstring)."""
    final = gsm8k_final(reference)
    if final is not None:
        return _to_number(final)
    text = _CALCULATOR_NOTE.sub("", reference)
    marked = _BOXED_NUMBER.findall(text) or _ANSWER_LINE.findall(text)
    if marked:
        return _to_number(marked[-1])
    numbers = _NUMBER.findall(text)  # a short answer with one number: '18', '$18', '5 apples', 'The answer is 18.'
    return _to_number(numbers[0]) if len(numbers) == 1 and len(text.split()) <= SHORT_ANSWER_WORDS else None


def heuristic_score(text: str, reference: str) -> float:
    """The reward of one completion (module docstring): the quality score, gated on the final answer."""
    if not text.strip():
        return 0.0
    quality = heuristic_parts(text, reference).total
    expected = final_answer(reference)
    if expected is None:
        return quality
    got = extract_final_number(_CALCULATOR_NOTE.sub("", text))
    right = got is not None and abs(got - expected) < 1e-9
    return RIGHT_FLOOR + QUALITY_SHARE * quality if right else QUALITY_SHARE * quality


def heuristic_math_qa(completions: list, answer: list | None = None, **kwargs) -> list[float | None]:
    """0.2 length + 0.3 formulas + 0.3 concepts + 0.2 structure against the reference answer, gated on the final
    answer (module docstring), in [0, 1]. None where the reference is missing or empty."""
    if answer is None:
        raise ValueError("heuristic_math_qa needs the reference answer in a dataset column named 'answer' "
                         "(or reference / solution / ground_truth)")
    scores: list[float | None] = []
    for completion, reference in zip(completions, answer, strict=True):
        if reference is None or not str(reference).split():
            scores.append(None)
            continue
        scores.append(heuristic_score(completion_text(completion), str(reference)))
    return scores
