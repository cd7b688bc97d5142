"""`code_tests`: judge each completion's code by its test cases, in the sandbox; reward = fraction passed.

Dataset formats (columns reach the reward by name):
- HumanEval: `prompt` (imports, signature, docstring; it arrives as `prompts`), `test` (defines
  `def check(candidate): assert ...`), `entry_point` (the function's name).
- MBPP-like (`problem` / `tests` / `solution`): `tests` is a list of assert strings, one string of
  asserts, or a JSON list in a string (as CSV stores lists); the completion is the whole program.
- Stdin/stdout (APPS, CodeContests-style): `input_output` ({"inputs": [...], "outputs": [...]}, optionally
  "fn_name"; a JSON string of it as APPS stores it), or `tests` as a list of {"input": ..., "output": ...}.

The program for a completion: code is taken from a ```python fenced block when there is one (the
block that defines the entry point, else the first; an unclosed fence runs to the end), else from
the text before a stray closing fence, else the whole text. Code that defines `def <entry_point>`
replaces the prompt's stub but keeps the prompt's other top-level code (its imports, and helpers
that tests call, such as HumanEval/32's `poly`); other code continues the prompt (prompt +
completion; indented once more if it does not parse otherwise). When nothing parses, trailing
lines are dropped until it does (a completion cut off by the length limit after a finished
function still counts). Top-level `if __name__ == "__main__":` blocks of the code are dropped.

Judged where the solution cannot reach (call mode: HumanEval, assert lists). The completion's program runs in
one sandboxed process, the tests in a second one that never executes the completion's code (`sandbox.
run_connected`): the tests' calls to the entry point, and to any other function of the solution's that they
name without defining it, go over a pipe, and arguments and return values cross as plain data
(`judge_wire.py`: None, bool, int, float, str, bytes, complex, list, tuple, dict, set, frozenset, decoded by
the judge into builtins). So an object with its own `__eq__` or `__bool__`, a subclass of a builtin, a patched
`builtins` or `math`, a trace function, an atexit handler, an early `os._exit(0)`, output that imitates the
report: none of it reaches the tests, which count passed cases and print the report on their own stdout. A
return value that is not plain data fails its case. The judge runs the prompt's own code (imports, helpers
such as HumanEval/32's `poly`) from the prompt, never the solution's version of it, and the solution's
top-level `import module [as name]` statements whose names the tests use without importing them (MBPP-style
`math.isclose`, `np.array`: the judge imports the module itself; never `from module import name`, which could
bind any object); names of grpokit's own (`_grpokit_*`) are never the solution's. A return value that is a
subclass of a builtin (Counter, OrderedDict, a namedtuple) crosses as the plain value it holds. Not supported in
call mode: tests that use a solution's object other than by calling a function (a class instance's methods,
a module constant), and tests that expect an argument to be changed in place (arguments are copies).

Partial credit: the test's statements are split with `ast` into cases. Each top-level statement of `check`
(or of the `tests` string, or each list item) that contains an assert is one case; a `for` loop of asserts is
one case; other statements (imports, assignments) are setup, and so are `assert True` placeholders. Each case
runs in its own try block in the judge, so one failure does not stop the rest.

Stdin/stdout mode (APPS `input_output` = {"inputs": [...], "outputs": [...]}, or `tests` as
[{"input": ..., "output": ...}, ...]): the whole program runs once per case with that input; a case passes when
the run exits 0 and its output equals the expected one after whitespace is normalised (`normalise_output`),
compared here, in the parent. Once a case times out, the completion's cases not yet started are not run (each
would cost the whole limit again) and fail. With APPS's `fn_name` the inputs are argument lists and the outputs
return values (a value or a one-item list of it), judged as in call mode; a `class Solution` with that method is
called too.

A completion whose entry point has no body (only its docstring, constants, `pass`: it restates the prompt)
scores 0 without running: returning None is no attempt, even where a test expects None.

Scores: the fraction of cases passed. The solution's process ending in a timeout or a crash (memory, a signal,
an exit code other than 0 and 1) -> 0.0 (the code is at fault); a sandbox error on either side -> None
(missing, not 0); the tests' own process failing -> 0.0. Rows without tests -> None. `last_outcomes` keeps the
outcome of each completion of the last call (None where nothing ran), `last_results` a result whose detail
says how many cases passed or why none could.
"""

from __future__ import annotations

import ast
import builtins
import json
import re
import secrets
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from grpokit.rewards.builtin import completion_text
from grpokit.rewards.sandbox import Outcome, SandboxLimits, SandboxResult, run_connected, run_python

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_PYTHON_TAGS = ("", "python", "py", "python3", "py3")
_MAX_CUTS = 50
_WIRE = Path(__file__).with_name("judge_wire.py").read_text()


@dataclass(slots=True, kw_only=True)
class TestProgram:
    """How one completion is judged.

    Call mode (`judge` set): `solution` is the completion's program followed by the loop that answers calls;
    `judge` holds the tests, calling the solution's functions over the pipe, and prints `<nonce> passed total`.
    Stdin/stdout mode (`io_cases` set): `solution` is the whole program, run once per case on its input."""

    solution: str
    nonce: str
    total: int  # number of test cases
    judge: str | None = None
    io_cases: list[tuple[str, str]] | None = None  # (stdin, expected stdout)
    stub: str | None = None  # why the completion is not an attempt (scored 0 without running), e.g. an empty body


class CodeTests:
    """Fraction of test cases a completion's code passes, judged where that code cannot reach."""

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
                 entry_point: list | None = None, tests: list | None = None, input_output: list | None = None,
                 **kwargs: Any) -> list[float | None]:
        if prompts is None:
            prompts = kwargs.get("prompt")
        n = len(completions)
        for name, column in (("prompts", prompts), ("test", test), ("entry_point", entry_point), ("tests", tests),
                             ("input_output", input_output)):
            if column is not None and len(column) != n:
                raise ValueError(f"code_tests: column '{name}' has {len(column)} values for {n} completions")
        if test is None and tests is None and input_output is None:
            raise ValueError("code_tests needs a 'test' column (HumanEval: with 'entry_point'), a 'tests' column "
                             "(a list of assert strings, or of input/output pairs) or an 'input_output' column "
                             "(APPS: inputs, outputs, optionally fn_name)")
        programs: list[TestProgram | None] = []
        for i, completion in enumerate(completions):
            text = completion_text(completion)
            row_tests = tests[i] if tests is not None else None
            row_test = test[i] if test is not None else None
            row_entry = entry_point[i] if entry_point is not None else None
            row_io = input_output[i] if input_output is not None else None
            prompt = _prompt_code(prompts[i]) if prompts is not None else ""
            if row_test and row_entry:
                programs.append(humaneval_program(text, prompt, row_test, row_entry, row=i))
            elif row_io is not None and not _empty(row_io):
                programs.append(io_program(text, row_io, row=i))
            elif _is_io_tests(row_tests):
                programs.append(io_program(text, row_tests, row=i))
            elif row_tests is not None and not _empty(row_tests):
                programs.append(asserts_program(text, row_tests, entry_point=row_entry, row=i))
            else:
                programs.append(None)
        return self._judge(programs)

    def _judge(self, programs: list[TestProgram | None]) -> list[float | None]:
        n = len(programs)
        self.last_results = [None] * n
        scores: list[float | None] = [None] * n
        calls = [(i, p) for i, p in enumerate(programs) if p is not None and p.total > 0 and p.judge is not None
                 and p.stub is None]
        ios = [(i, p) for i, p in enumerate(programs) if p is not None and p.total > 0 and p.io_cases is not None
               and p.stub is None]
        for i, program in enumerate(programs):
            if program is not None and program.total > 0 and program.stub is not None:
                self.last_results[i] = SandboxResult(outcome="failed", returncode=None, stdout="", stderr="",
                                                     wall_s=0.0, detail=program.stub)
                scores[i] = 0.0
        judge_limits = replace(self.limits, wall_s=self.limits.wall_s + _JUDGE_GRACE_S)
        pairs = run_many_connected([(p.solution, p.judge) for _, p in calls], self.limits, judge_limits,
                                   self.max_workers)
        for (i, program), (solution, judge) in zip(calls, pairs, strict=True):
            self.last_results[i], scores[i] = call_verdict(solution, judge, program)
        flat = [(k, stdin) for k, (_, p) in enumerate(ios) for stdin, _ in p.io_cases]
        runs = run_io_cases([(ios[k][1].solution, stdin, k) for k, stdin in flat], self.limits, self.max_workers)
        for k, (i, program) in enumerate(ios):
            mine = [r for (owner, _), r in zip(flat, runs, strict=True) if owner == k]
            self.last_results[i], scores[i] = io_verdict(mine, program)
        self.last_outcomes = [r.outcome if r is not None else None for r in self.last_results]
        return scores


_JUDGE_GRACE_S = 2.0  # the judge outlives the solution's wall limit by this much, to report what it saw


def run_many_connected(pairs: Sequence[tuple[str, str]], limits: SandboxLimits, judge_limits: SandboxLimits,
                       max_workers: int) -> list[tuple[SandboxResult, SandboxResult]]:
    """`run_connected` over (solution, judge) pairs, up to `max_workers` pairs at once, in order."""
    if not pairs:
        return []
    if max_workers <= 1 or len(pairs) == 1:
        return [run_connected(s, j, limits, judge_limits) for s, j in pairs]
    with ThreadPoolExecutor(max_workers=min(max_workers, len(pairs)), thread_name_prefix="code-tests") as pool:
        return list(pool.map(lambda pair: run_connected(pair[0], pair[1], limits, judge_limits), pairs))


def call_verdict(solution: SandboxResult, judge: SandboxResult, program: TestProgram
                 ) -> tuple[SandboxResult, float | None]:
    """One completion's outcome and score from its two runs. The score is the judge's count; the solution's own
    run decides only the outcome: a timeout or crash is 0 (the code is at fault), a sandbox error on either side is
    missing (None), never 0."""
    for run in (solution, judge):
        if run.outcome == "sandbox_error":
            return run, None
    if solution.outcome in ("timeout", "crashed"):
        return solution, 0.0
    if judge.outcome != "passed":  # the tests' own code failed or overran: nothing to count
        return replace(judge, detail=f"the judge: {judge.detail}"), 0.0
    passed = None
    for line in reversed(judge.stdout.splitlines()):
        parts = line.split()
        if len(parts) == 3 and parts[0] == program.nonce and parts[1].isdigit() and parts[2] == str(program.total):
            passed = min(int(parts[1]), program.total)
            break
    if passed is None:
        return replace(judge, outcome="failed", detail="the judge wrote no report"), 0.0
    detail = f"{passed} of {program.total} test cases passed"
    if solution.outcome == "failed":  # the program raised before it could answer (a SyntaxError, an import error)
        return replace(solution, detail=f"{solution.detail}; {detail}"), passed / program.total
    return replace(solution, detail=detail, stdout=judge.stdout), passed / program.total


def run_io_cases(cases: Sequence[tuple[str, str, int]], limits: SandboxLimits, max_workers: int
                 ) -> list[SandboxResult]:
    """(program, stdin, owner) runs, up to `max_workers` at once, in order. Once a run of an owner (a completion)
    times out, its cases not yet started are not run: each would cost the whole time limit again, as a looping
    program does on every input. They come back as timeouts that say so."""
    timed_out: set[int] = set()
    lock = threading.Lock()

    def one(case: tuple[str, str, int]) -> SandboxResult:
        code, stdin, owner = case
        with lock:
            skip = owner in timed_out
        if skip:
            return SandboxResult(outcome="timeout", returncode=None, stdout="", stderr="", wall_s=0.0,
                                 detail="not run: an earlier case of this completion timed out")
        result = run_python(code, limits=limits, stdin=stdin)
        if result.outcome == "timeout":
            with lock:
                timed_out.add(owner)
        return result

    if not cases:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(cases))), thread_name_prefix="io-case") as pool:
        return list(pool.map(one, cases))


def io_verdict(runs: list[SandboxResult], program: TestProgram) -> tuple[SandboxResult, float | None]:
    """Stdin/stdout cases: a case passes when its run exits 0 and its output equals the expected one after
    whitespace is normalised (`normalise_output`). Each case is its own run: a timeout fails that case, and the
    completion's cases not started by then are not run (`run_io_cases`)."""
    if any(r.outcome == "sandbox_error" for r in runs):
        return next(r for r in runs if r.outcome == "sandbox_error"), None
    passed = sum(1 for r, (_, expected) in zip(runs, program.io_cases, strict=True)
                 if r.outcome == "passed" and not r.output_truncated
                 and normalise_output(r.stdout) == normalise_output(expected))
    worst = next((r for r in runs if r.outcome != "passed"), runs[0])
    outcome = "passed" if all(r.outcome == "passed" for r in runs) else worst.outcome
    return replace(worst, outcome=outcome, detail=f"{passed} of {program.total} test cases passed"
                   + ("" if outcome == "passed" else f"; a run: {worst.detail}")), passed / program.total


def normalise_output(text: str) -> str:
    """Whitespace-insensitive form of a program's output: runs of blanks in a line become one space, lines are
    stripped, and blank lines at the start and end are dropped."""
    lines = [" ".join(line.split()) for line in str(text).splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# building programs


def humaneval_program(completion: str, prompt: str, test: str, entry_point: str, *, row: int = 0) -> TestProgram:
    """Completion + prompt as HumanEval expects; `check`'s asserts, as separately counted cases, in the judge."""
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
    return _assemble(code, _prompt_context(prompt, entry_point), preamble, check.body,
                     param=check.args.args[0].arg, entry_point=entry_point)


def asserts_program(completion: str, tests: Sequence[str] | str, *, entry_point: str | None = None,
                    row: int = 0) -> TestProgram:
    """The completion's code; each assert of `tests`, as a separately counted case, in the judge."""
    if isinstance(tests, str) and tests.lstrip().startswith(("[", "{")):
        try:
            tests = json.loads(tests)
        except ValueError:
            pass
    if isinstance(tests, dict):
        raise ValueError(f"code_tests: row {row}: 'tests' is a mapping without 'input'/'inputs': give a list of assert "
                         "strings, one string of asserts, or input/output pairs ({\"input\": [...], \"output\": "
                         f"[...]}} or [{{\"input\": ..., \"output\": ...}}, ...]); got {str(tests)[:200]!r}")
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
    return _assemble(code, "", [], cases, param=None, entry_point=entry_point)


def io_program(completion: str, spec: Any, *, row: int = 0) -> TestProgram:
    """Stdin/stdout cases (APPS `input_output`, CodeContests-style `tests`), or APPS's call-based cases (`fn_name`:
    inputs are argument lists, outputs the return values, judged as in call mode)."""
    inputs, outputs, fn_name = _io_spec(spec, row)
    if fn_name:
        cases = [ast.parse(f"assert _grpokit_same({fn_name}(*_grpokit_case({json.dumps(args)!r})), "
                           f"_grpokit_case({json.dumps(want)!r}))").body[0]
                 for args, want in zip(inputs, outputs, strict=True)]
        code = build_solution(completion, "", None)
        return _assemble(code, "", [], cases, param=None, entry_point=fn_name)
    code = build_solution(completion, "", None)
    io_cases = [(_as_text(i), _as_text(o)) for i, o in zip(inputs, outputs, strict=True)]
    return TestProgram(solution=code, nonce="", total=len(io_cases), io_cases=io_cases)


def _io_spec(spec: Any, row: int) -> tuple[list, list, str | None]:
    """inputs, outputs, fn_name from the forms datasets use (a JSON string of any of them too)."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            raise ValueError(f"code_tests: row {row}: 'input_output' is not JSON: {spec[:200]!r}") from None
    fn_name = None
    if isinstance(spec, dict):
        fn_name = spec.get("fn_name") or None
        inputs = spec.get("inputs", spec.get("input"))
        outputs = spec.get("outputs", spec.get("output"))
    elif isinstance(spec, (list, tuple)) and all(isinstance(c, dict) for c in spec):
        inputs = [c.get("input", c.get("inputs")) for c in spec]
        outputs = [c.get("output", c.get("outputs")) for c in spec]
    else:
        inputs = outputs = None
    if not isinstance(inputs, (list, tuple)) or not isinstance(outputs, (list, tuple)) \
            or len(inputs) != len(outputs) or any(x is None for x in [*inputs, *outputs]):
        raise ValueError(f"code_tests: row {row}: input/output tests need as many inputs as outputs "
                         "({\"inputs\": [...], \"outputs\": [...]} or [{\"input\": ..., \"output\": ...}, ...]), "
                         f"got {str(spec)[:200]!r}")
    if fn_name is not None and (not isinstance(fn_name, str) or not fn_name.isidentifier()):
        raise ValueError(f"code_tests: row {row}: fn_name must be a function name, got {fn_name!r}")
    if fn_name and not all(isinstance(i, (list, tuple)) for i in inputs):
        raise ValueError(f"code_tests: row {row}: with fn_name each input is a list of arguments")
    return list(inputs), list(outputs), fn_name


def _as_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):  # some datasets store the lines
        return "\n".join(str(v) for v in value) + "\n"
    return str(value)


def _is_io_tests(tests: Any) -> bool:
    """A `tests` value of input/output pairs (as opposed to assert strings)."""
    if isinstance(tests, str):
        stripped = tests.lstrip()
        if not stripped.startswith(("{", "[")):
            return False
        try:
            tests = json.loads(stripped)
        except ValueError:
            return False
    if isinstance(tests, dict):
        return any(k in tests for k in ("input", "inputs"))
    return isinstance(tests, (list, tuple)) and bool(tests) and all(isinstance(t, dict) for t in tests)


def _empty(value: Any) -> bool:
    try:
        return len(value) == 0
    except TypeError:
        return False


def _as_one_case(body: list[ast.stmt]) -> ast.stmt:
    if len(body) == 1:
        return body[0]
    block = ast.parse("if True:\n    pass").body[0]
    block.body = body
    return block


_JUDGE_HELPERS = """
def _grpokit_case(text):
    return _grpokit_json.loads(text)


def _grpokit_plain(value):
    if type(value) is tuple or type(value) is list:
        return [_grpokit_plain(v) for v in value]
    if type(value) is dict:
        return {k: _grpokit_plain(v) for k, v in value.items()}
    return value


def _grpokit_same(got, want):
    # APPS's convention: a return value may be listed as itself or wrapped in a one-item list; tuples as lists
    got = _grpokit_plain(got)
    return got == want or (type(want) is list and len(want) == 1 and got == want[0])
"""


def _assemble(code: str, context: str, preamble: list[ast.stmt], statements: list[ast.stmt], *, param: str | None,
              entry_point: str | None) -> TestProgram:
    """The solution's program (its code, then the answering loop) and the judge's (the trusted prompt context and
    test preamble, proxies for the solution's functions the tests call, the counted cases, the report)."""
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
    remote, imports = _links(code, context, [*preamble, *statements], entry_point)
    links = "".join(f"{name} = _grpokit_remote({name!r})\n" for name in sorted(remote))
    argument = f"_grpokit_remote({entry_point!r})" if param and entry_point else ""
    runner = f"""

def _grpokit_main():
    import os as _os, sys as _sys
    try:
        _passed = _grpokit_cases({argument})
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
    harness = ast.unparse(ast.fix_missing_locations(ast.Module(body=[*preamble, function], type_ignores=[])))
    futures, context = _split_future(context)
    judge = (f"{futures}{_WIRE}\n{_JUDGE_HELPERS}\n_grpokit_remote = _grpokit_link(__grpokit_channel__)\n\n"
             f"{context}\n\n{imports}\n{links}\n\n{harness}\n{runner}")
    solution = f"{code}\n\n\n{_WIRE}\n\n_grpokit_serve(globals(), __grpokit_channel__)\n"
    return TestProgram(solution=solution, judge=judge, nonce=nonce, total=total,
                       stub=_stub(code, entry_point) if entry_point else None)


def _links(code: str, context: str, test_nodes: list[ast.stmt], entry_point: str | None) -> tuple[set[str], str]:
    """The names the tests use and do not bind that the solution defines (called over the pipe), and the import
    statements of the solution's that bind names the tests use without importing them (run in the judge)."""
    used, bound = _names(test_nodes)
    try:
        context_bound = _names(ast.parse(context).body)[1] if context.strip() else set()
    except SyntaxError:
        context_bound = set()
    free = {n for n in used - bound - context_bound - set(dir(builtins)) if not n.startswith("_grpokit")}
    defined, imports = _top_level(code)
    remote = (free & defined) - set(imports)
    if entry_point:
        remote.add(entry_point)
    statements = sorted({imports[name] for name in (free & set(imports)) - remote})
    return remote, "".join(f"try:\n    {s}\nexcept BaseException:\n    pass\n" for s in statements)


def _names(nodes: list[ast.stmt]) -> tuple[set[str], set[str]]:
    """(names loaded, names bound) anywhere in `nodes`, any scope."""
    used: set[str] = set()
    bound: set[str] = set()
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound.update(node.names)
    return used, bound


def _top_level(code: str) -> tuple[set[str], dict[str, str]]:
    """Names the solution's code binds at top level, and for those bound by `import module [as name]`, that
    import statement (the judge imports the module itself)."""
    try:
        module = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return set(), {}
    defined: set[str] = set()
    imports: dict[str, str] = {}
    for node in module.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                defined.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, ast.ImportFrom):  # a function the tests call by this name runs in the solution
            defined.update(a.asname or a.name for a in node.names if a.name != "*")
        elif isinstance(node, ast.Import):  # modules only: `from m import f` could bind any object as a name
            for alias in node.names:
                imports[(alias.asname or alias.name).split(".")[0]] = ast.unparse(ast.Import(names=[alias]))
    return defined, imports


def _stub(code: str, entry_point: str) -> str | None:
    """Why the code's (last) definition of the entry point is no attempt: a body of only docstrings, other
    constants, `pass` or `...` (a completion that restates the prompt). None when it has a body."""
    try:
        module = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    found = [n for n in module.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == entry_point]
    if not found:
        return None
    if all(isinstance(n, ast.Pass) or (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
           for n in found[-1].body):
        return f"'{entry_point}' has no body (only its signature and docstring): not an attempt, scored 0"
    return None


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


_FUTURE = re.compile(r"^from\s+__future__\s+import\s+[^\n]*\n?", re.M)


def _split_future(code: str) -> tuple[str, str]:
    """(the top-level `from __future__ import` lines, the rest): such imports must come first in a program."""
    futures = _FUTURE.findall(code)
    return "".join(f if f.endswith("\n") else f + "\n" for f in futures), _FUTURE.sub("", code)


def _program_for(code: str, prompt: str, entry_point: str | None) -> str:
    if entry_point and _defines(code, entry_point):
        context = _prompt_context(prompt, entry_point)
        if not context:
            return code
        futures, joined = _split_future(f"{context}\n\n{code}")
        return futures + joined
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
