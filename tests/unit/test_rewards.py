import math

import pytest
import torch

from grpokit.errors import RewardError
from grpokit.rewards import RewardFunction, resolve_reward, score
from grpokit.rewards.builtin import answer_format, extract_final_number, number_correct


@pytest.mark.parametrize(("text", "value"), [
    ("7 + 5 = 12", 12.0),
    ("First 3, then 4. Answer: 7", 7.0),
    ("Answer: -3\nThis is a classic example with 99 apples.", -3.0),  # the marked answer wins over later numbers
    ("So the total is 1,234.", 1234.0),
    ("the result is 2.5", 2.5),
    ("no numbers here", None),
])
def test_extract_final_number(text, value):
    assert extract_final_number(text) == value


def test_number_correct_plain_and_chat_completions():
    completions = ["It is 12", "Answer: 11", [{"role": "assistant", "content": "so 12"}], "nothing"]
    assert number_correct(completions, answer=["12", "12", "12", "12"]) == [1.0, 0.0, 1.0, 0.0]


def test_number_correct_is_not_applicable_without_numeric_reference():
    assert number_correct(["12"], answer=["twelve"]) == [None]


@pytest.mark.parametrize(("text", "score_"), [
    ("3 + 4 = 7\nAnswer: 7", 1.0),
    ("Answer: 7.", 1.0),
    ("**Answer:** 7", 1.0),
    ("So 3 + 4 is 7.", 0.0),  # a bare final number is not the asked-for form (see builtin.py)
    ("Answer: 7\nand then more text", 0.0),
    ("The answer is 7. This is a classic example of addition.", 0.0),
    ("", 0.0),
])
def test_answer_format(text, score_):
    assert answer_format([text]) == [score_]


def _call(fn, n=2, columns=None):
    columns = columns or {"prompt": ["p"] * n, "answer": ["1"] * n, "topic": ["t"] * n}
    return RewardFunction(name=fn.__name__, fn=fn)(["p"] * n, ["c"] * n, [[1]] * n, columns)


def test_binding_by_parameter_name():
    def trl_style(prompts, completions, completion_ids, **kwargs):
        assert kwargs["answer"] == ["1", "1"] and kwargs["topic"] == ["t", "t"] and "prompt" not in kwargs
        return [1.0, 0.0]

    def axolotl_style(prompts, completions, labels, context=None):
        assert labels == ["1", "1"]  # bound to the answer column under another name
        return [0.5, 0.5]

    def minimal(completions, prompts=None):
        return [2, True]

    assert _call(trl_style) == [1.0, 0.0]
    assert _call(axolotl_style) == [0.5, 0.5]
    assert _call(minimal) == [2.0, 1.0]


def test_none_and_nan_become_not_applicable():
    def partial(completions, **kwargs):
        return [None, float("nan")]

    assert all(math.isnan(v) for v in _call(partial))


def test_tensor_results_are_accepted():
    def tensor_reward(completions, **kwargs):
        return torch.tensor([0.25, 0.75])

    assert _call(tensor_reward) == [0.25, 0.75]


@pytest.mark.parametrize(("result", "message"), [
    ([1.0], "returned 1 values for 2 completions"),
    (3.0, "returned float"),
    (["a", "b"], "returned str"),
])
def test_wrong_length_or_type_names_the_function(result, message):
    def bad_reward(completions, **kwargs):
        return result

    with pytest.raises(RewardError, match=f"'bad_reward' {message}"):
        _call(bad_reward)


def test_exception_names_the_function():
    def crashing(completions, **kwargs):
        raise ZeroDivisionError("boom")

    with pytest.raises(RewardError, match="'crashing' raised ZeroDivisionError: boom"):
        _call(crashing)


def test_argument_matching_no_column_is_a_clear_error():
    def needs_missing(completions, difficulty):
        return [0.0, 0.0]

    with pytest.raises(RewardError, match="needs argument 'difficulty'.*columns"):
        _call(needs_missing, columns={"prompt": ["p", "p"], "topic": ["a", "b"]})


def test_resolve_builtin_file_and_dotted(tmp_path, monkeypatch):
    assert resolve_reward("number_correct").fn is number_correct
    (tmp_path / "resolve_test_rewards.py").write_text("def short(completions, **kw):\n    return [-len(c) for c in completions]\n")
    by_file = resolve_reward(f"{tmp_path / 'resolve_test_rewards.py'}:short")
    monkeypatch.chdir(tmp_path)
    by_module = resolve_reward("resolve_test_rewards.short")
    for f in (by_file, by_module):
        assert f.name == "short" and f(["p"], ["abc"], [[1]], {"prompt": ["p"]}) == [-3.0]


def test_unknown_reward_suggests_a_builtin():
    with pytest.raises(RewardError, match="did you mean 'number_correct'"):
        resolve_reward("number_corect")


def test_score_matrix_shape_and_order():
    funcs = [resolve_reward("number_correct"), resolve_reward("answer_format")]
    matrix = score(funcs, ["p", "p"], ["Answer: 3", "4"], [[1], [2]], {"prompt": ["p", "p"], "answer": ["3", "3"]})
    assert matrix.tolist() == [[1.0, 1.0], [0.0, 0.0]]
