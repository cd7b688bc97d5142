"""`code_tests`: run each completion's code against its test cases in the sandbox; reward = fraction passed.

Dataset formats (columns reach the reward by name):
- HumanEval: `prompt` (imports, signature, docstring; it arrives as `prompts`), `test` (defines
  `def check(candidate): assert ...`), `entry_point` (the function's name).
- MBPP-like (`problem` / `tests` / `solution`): `tests` is a list of assert strings, one string of
  asserts, or a JSON list in a string (as CSV stores lists); the completion is the whole program.

The program for a completion: code is taken from a ```python fenced block when there is one (the
block that defines the entry point, else the first; an unclosed fence runs to the end), else from
the text before a stray closing fence, else the whole text. Code that defines `def <entry_point>`
replaces the prompt's stub but keeps the prompt's other top-level code (its imports, and helpers
that tests call, such as HumanEval/32's `poly`); other code continues the prompt (prompt +
completion; indented once more if it does not parse otherwise). When nothing parses, trailing
lines are dropped until it does (a completion cut off by the length limit after a finished
function still counts). Top-level `if __name__ == "__main__":` blocks of the code are dropped.

Partial credit: the test's statements are split with `ast` into cases. Each top-level statement of
`check` (or of the `tests` string, or each list item) that contains an assert is one case; a
`for` loop of asserts is one case; other statements (imports, assignments) are setup, and so are
`assert True` placeholders. All cases run in ONE sandbox process per completion, each inside its own
try block, so one failure does not stop the rest. The harness then writes `<nonce> passed total`
to stdout and leaves with os._exit (skipping the program's atexit handlers). The nonce is random
per completion, so a program's own prints cannot fake the line unless the program goes looking for
it (its own source is readable; gc.get_objects is refused): unforgeable-ish, not unforgeable.

Scores: outcome passed/failed -> passed / total (0.0 without the harness line: a syntax error, an
exception at import time, an early exit); timeout/crashed -> 0.0 (the code is at fault);
sandbox_error -> None (missing, not 0). Rows without tests -> None. `last_outcomes` keeps the
outcome of each completion of the last call (None where nothing ran).
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from grpokit.rewards.builtin import completion_text
from grpokit.rewards.sandbox import Outcome, SandboxLimits, SandboxResult, run_many

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_PYTHON_TAGS = ("", "python", "py", "python3", "py3")
_MAX_CUTS = 50


@dataclass(slots=True, kw_only=True)
class TestProgram:
    """The program run for one completion and how to read its result."""

    source: str
    nonce: str
    total: int  # number of test cases


class CodeTests:
    """Fraction of test cases a completion's code passes, run in `grpokit.rewards.sandbox`."""

    expensive = True
    isolation = "inline"  # the sandbox bounds every run (wall, CPU, memory); a worker around it would add nothing

    def __init__(self, *, timeout_s: float = 10.0, memory_mb: int = 1024, max_workers: int = 2,
                 cpu_s: float | None = None, max_output_bytes: int = 1_000_000) -> None:
        self.limits = SandboxLimits(wall_s=timeout_s, cpu_s=cpu_s if cpu_s is not None else timeout_s,
                                    memory_mb=memory_mb, max_output_bytes=max_output_bytes)
        self.max_workers = max_workers
        self.last_outcomes: list[Outcome | None] = []
        self.last_results: list[SandboxResult | None] = []

    def __call__(self, completions: list, prompts: list | None = None, test: list | None = None,
                 entry_point: list | None = None, tests: list | None = None, **kwargs: Any) -> list[float | None]:
        if prompts is None:
            prompts = kwargs.get("prompt")
        n = len(completions)
        for name, column in (("prompts", prompts), ("test", test), ("entry_point", entry_point), ("tests", tests)):
            if column is not None and len(column) != n:
                raise ValueError(f"code_tests: column '{name}' has {len(column)} values for {n} completions")
        if test is None and tests is None:
            raise ValueError("code_tests needs a 'test' column (HumanEval: with 'entry_point') or a 'tests' column "
                             "(a list of assert strings)")
        programs: list[TestProgram | None] = []
        for i, completion in enumerate(completions):
            text = completion_text(completion)
            row_tests = tests[i] if tests is not None else None
            row_test = test[i] if test is not None else None
            row_entry = entry_point[i] if entry_point is not None else None
            prompt = _prompt_code(prompts[i]) if prompts is not None else ""
            if row_test and row_entry:
                programs.append(humaneval_program(text, prompt, row_test, row_entry, row=i))
            elif row_tests is not None and len(row_tests) > 0:
                programs.append(asserts_program(text, row_tests, entry_point=row_entry, row=i))
            else:
                programs.append(None)

        to_run = [(i, p) for i, p in enumerate(programs) if p is not None and p.total > 0]
        results = run_many([p.source for _, p in to_run], self.limits, self.max_workers)
        self.last_results = [None] * n
        scores: list[float | None] = [None] * n
        for (i, program), result in zip(to_run, results, strict=True):
            self.last_results[i] = result
            scores[i] = score(result, program)
        self.last_outcomes = [r.outcome if r is not None else None for r in self.last_results]
        return scores


def score(result: SandboxResult, program: TestProgram) -> float | None:
    if result.outcome == "sandbox_error":
        return None
    if result.outcome in ("timeout", "crashed"):
        return 0.0
    for line in reversed(result.stdout.splitlines()):
        parts = line.split()
        if len(parts) == 3 and parts[0] == program.nonce and parts[1].isdigit() and parts[2] == str(program.total):
            return min(int(parts[1]), program.total) / program.total
    return 0.0  # no report: the program did not get as far as the tests


# ---------------------------------------------------------------------------------------------
# building programs


def humaneval_program(completion: str, prompt: str, test: str, entry_point: str, *, row: int = 0) -> TestProgram:
    """Completion + prompt as HumanEval expects, then `check`'s asserts as separately counted cases."""
    try:
        test_module = ast.parse(test)
    except SyntaxError as exc:
        raise ValueError(f"code_tests: row {row}: the 'test' column does not parse: {exc}") from None
    check = next((node for node in test_module.body
                  if isinstance(node, ast.FunctionDef) and node.name == "check"), None)
    if check is None or not check.args.args:
        raise ValueError(f"code_tests: row {row}: the 'test' column defines no 'def check(candidate)'")
    preamble = [node for node in test_module.body if node is not check]
    code = build_solution(completion, prompt, entry_point)
    return _assemble(code, preamble, check.body, param=check.args.args[0].arg, argument=entry_point)


def asserts_program(completion: str, tests: Sequence[str] | str, *, entry_point: str | None = None,
                    row: int = 0) -> TestProgram:
    """The completion's code, then each assert of `tests` as a separately counted case."""
    if isinstance(tests, str) and tests.lstrip().startswith("["):
        try:
            tests = json.loads(tests)
        except ValueError:
            pass
    cases: list[ast.stmt] = []
    items = [tests] if isinstance(tests, str) else list(tests)
    for item in items:
        try:
            body = ast.parse(str(item)).body
        except SyntaxError as exc:
            raise ValueError(f"code_tests: row {row}: a test does not parse ({exc}): {str(item)[:200]!r}") from None
        if isinstance(tests, str):
            cases.extend(body)  # one string: each statement on its own
        elif body:
            cases.append(_as_one_case(body))  # one list item: one case
    code = build_solution(completion, "", entry_point)
    return _assemble(code, [], cases, param=None, argument=None)


def _as_one_case(body: list[ast.stmt]) -> ast.stmt:
    if len(body) == 1:
        return body[0]
    block = ast.parse("if True:\n    pass").body[0]
    block.body = body
    return block


def _assemble(code: str, preamble: list[ast.stmt], statements: list[ast.stmt], *, param: str | None,
              argument: str | None) -> TestProgram:
    nonce = secrets.token_hex(16)
    function = ast.parse(f"def _grpokit_cases({param or ''}):\n"
                         "    _grpokit_passed = 0\n    return _grpokit_passed").body[0]
    total = 0
    body: list[ast.stmt] = [function.body[0]]
    for statement in statements:
        guarded = ast.parse("try:\n    pass\nexcept BaseException:\n    pass").body[0]
        guarded.body = [statement]
        if _is_case(statement):
            guarded.body.append(ast.parse("_grpokit_passed += 1").body[0])
            total += 1
        body.append(guarded)
    function.body = [*body, function.body[1]]
    harness = ast.Module(body=[*preamble, function], type_ignores=[])
    call = f"_grpokit_cases({argument})" if argument else "_grpokit_cases()"
    runner = f"""

def _grpokit_main():
    import os as _os, sys as _sys
    try:
        _passed = {call}
    except BaseException:
        _passed = 0
    for _stream in (_sys.stdout, _sys.stderr):
        try:
            _stream.flush()
        except BaseException:
            pass
    _os.write(1, ("\\n{nonce} %d {total}\\n" % _passed).encode())
    _os._exit(0)


_grpokit_main()
"""
    source = f"{code}\n\n\n{ast.unparse(ast.fix_missing_locations(harness))}\n{runner}"
    return TestProgram(source=source, nonce=nonce, total=total)


def _is_case(statement: ast.stmt) -> bool:
    """A statement that asserts something other than a constant, not counting asserts in nested defs."""
    pending = [statement]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Assert) and not isinstance(node.test, ast.Constant):
            return True
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                pending.append(child)
    return False


def build_solution(completion: str, prompt: str, entry_point: str | None) -> str:
    """The program text for a completion (see the module docstring for the rules)."""
    attempts = [_program_for(code, prompt, entry_point) for code in _code_candidates(completion, entry_point)]
    for program in attempts:
        if _parses(program):
            return _drop_main_guard(program)
    for program in attempts:  # cut what follows the code of a completion that ran on (or was cut off)
        lines = program.splitlines()
        floor = len(prompt.splitlines())
        cuts = [end for end in range(len(lines) - 1, floor, -1) if lines[end][:1] not in ("", " ", "\t")]
        for end in cuts[:_MAX_CUTS]:  # at top-level statements only, the last few: bounded work per completion
            shorter = "\n".join(lines[:end])
            if _parses(shorter) and (entry_point is None or _defines(shorter, entry_point)):
                return _drop_main_guard(shorter)
    return attempts[0]  # does not parse: the run fails with a SyntaxError and scores 0


def _code_candidates(text: str, entry_point: str | None) -> list[str]:
    blocks = [body for tag, body in _FENCE.findall(text) if tag.lower() in _PYTHON_TAGS]
    if entry_point:
        blocks.sort(key=lambda b: not _defines(b, entry_point))  # stable: the first defining block first
    candidates = list(blocks)
    fence = text.find("```")
    if fence > 0 and text[:fence].strip():
        candidates.append(text[:fence])  # a continuation that closes a fence the prompt opened
    candidates.append(text)
    return candidates


def _program_for(code: str, prompt: str, entry_point: str | None) -> str:
    if entry_point and _defines(code, entry_point):
        context = _prompt_context(prompt, entry_point)
        return f"{context}\n\n{code}" if context else code
    if not prompt:
        return code
    joined = prompt + code
    if not _parses(joined):
        indented = "\n".join("    " + line if line.strip() else line for line in code.splitlines())
        if _parses(prompt + indented):
            return prompt + indented
    return joined


def _prompt_context(prompt: str, entry_point: str) -> str:
    """The prompt's top-level code without its stub of `entry_point` (imports, helpers, constants)."""
    if not prompt.strip():
        return ""
    try:
        module = ast.parse(prompt)
    except SyntaxError:
        return "\n".join(line for line in prompt.splitlines() if re.match(r"\s*(from\s+\S+\s+)?import\s", line))
    lines = prompt.splitlines()
    drop: set[int] = set()
    for node in module.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point:
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            drop.update(range(first - 1, node.end_lineno))
    return "\n".join(line for i, line in enumerate(lines) if i not in drop).rstrip()


def _prompt_code(prompt: Any) -> str:
    """The code part of a prompt: the text itself, or a chat prompt's last user message (its fenced code if it is
    prose)."""
    if prompt is None:
        return ""
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        text = str(users[-1].get("content", "")) if users else ""
    else:
        text = str(prompt)
    if _parses(text):
        return text
    blocks = [body for tag, body in _FENCE.findall(text) if tag.lower() in _PYTHON_TAGS]
    return blocks[0] if blocks else ""


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*(async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def _parses(code: str) -> bool:
    """Compiles (not only parses: `return` outside a function is the compiler's error, not the parser's)."""
    try:
        compile(code, "<completion>", "exec", dont_inherit=True)
    # model output: ValueError for null bytes; MemoryError / RecursionError are how the parser and the
    # compiler refuse nesting that is too deep ("-" * 100000 + "1")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def _drop_main_guard(program: str) -> str:
    module = ast.parse(program)
    kept = [node for node in module.body if not _is_main_guard(node)]
    if len(kept) == len(module.body):
        return program
    try:
        return ast.unparse(ast.Module(body=kept, type_ignores=[]))
    except RecursionError:  # nesting deeper than ast.unparse's Python recursion allows: run it as written
        return program


def _is_main_guard(node: ast.stmt) -> bool:
    if not (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and len(node.test.comparators) == 1):
        return False
    sides = [node.test.left, node.test.comparators[0]]
    names = {s.id for s in sides if isinstance(s, ast.Name)}
    values = {s.value for s in sides if isinstance(s, ast.Constant)}
    return names == {"__name__"} and values == {"__main__"} and isinstance(node.test.ops[0], ast.Eq)
