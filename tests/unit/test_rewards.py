"""The reward contract (binding, classes, async, per-sample) and the runner (timeouts, errors, cache)."""

import asyncio
import json
import logging
import math
import os
import threading
import time

import pytest
import torch

from grpokit.errors import RewardError
from grpokit.rewards import (
    RewardBatch,
    RewardFunction,
    RewardRunner,
    per_sample,
    resolve_reward,
    resolve_rewards,
    score,
)
from grpokit.rewards.builtin import number_correct
from grpokit.rewards.spec import RewardModel, RewardSpec

COLUMNS = {"prompt": ["p", "p"], "answer": ["1", "1"], "topic": ["t", "t"]}


def _call(fn, n=2, columns=None, completions=None):
    columns = columns or COLUMNS
    return RewardFunction.wrap(getattr(fn, "__name__", "f"), fn)(["p"] * n, completions or ["c"] * n, [[1]] * n,
                                                                 columns)


def _batch(completions, answers=None, prompts=None, **columns):
    n = len(completions)
    cols = {"prompt": prompts or ["p"] * n, "answer": answers or ["1"] * n, **columns}
    return RewardBatch(prompts=cols["prompt"], completions=list(completions), completion_ids=[[1, 2]] * n,
                       columns=cols, context={"max_completion_length": 16, "step": 3})


def _runner(*fns, **kwargs):
    return RewardRunner([f if isinstance(f, RewardFunction) else RewardFunction.wrap(f.__name__, f) for f in fns],
                        **kwargs)


# ---- binding --------------------------------------------------------------------------------------

def test_binding_by_parameter_name():
    def trl_style(prompts, completions, completion_ids, **kwargs):
        assert kwargs["answer"] == ["1", "1"] and kwargs["topic"] == ["t", "t"] and "prompt" not in kwargs
        return [1.0, 0.0]

    def axolotl_style(prompts, completions, labels, context=None):
        assert labels == ["1", "1"] and context == {}  # labels: the answer column; context: the run's (none here)
        return [0.5, 0.5]

    def minimal(completions, prompts=None):
        return [2, True]

    assert _call(trl_style) == [1.0, 0.0]
    assert _call(axolotl_style) == [0.5, 0.5]
    assert _call(minimal) == [2.0, 1.0]


def test_run_context_reaches_kwargs_and_named_parameters():
    seen = {}

    def trl_style(prompts, completions, **kwargs):
        seen.update(kwargs)
        return [0.0] * len(completions)

    def overlong(completions, completion_ids, max_completion_length):
        return [float(len(ids) - max_completion_length) for ids in completion_ids]

    batch = _batch(["a", "b"])
    assert RewardFunction.wrap("t", trl_style).invoke(batch) == [0.0, 0.0]
    assert seen["max_completion_length"] == 16 and seen["step"] == 3 and seen["completion_ids"] == [[1, 2]] * 2
    assert RewardFunction.wrap("o", overlong).invoke(batch) == [-14.0, -14.0]


def test_per_sample_functions_get_one_row_each():
    @per_sample
    def exact(completion, answer):
        return 1.0 if completion == answer else 0.0

    @per_sample
    def reward(generated, ground_truth):  # the signature of reference workflow 004
        return float(generated == ground_truth)

    @per_sample
    def with_prompt_and_column(prompt, completion, topic, **kwargs):
        assert kwargs["answer"] in ("7", "8") and kwargs["step"] == 3
        return float(len(prompt + completion + topic))

    batch = _batch(["7", "9"], answers=["7", "8"], prompts=["ab", "c"], topic=["x", "yz"])
    for fn in (exact, reward):
        assert RewardFunction.wrap(fn.__name__, fn).invoke(batch) == [1.0, 0.0]
    assert RewardFunction.wrap("w", with_prompt_and_column).invoke(batch) == [4.0, 4.0]


def test_chat_completions_arrive_as_message_lists():
    def needs_messages(completions, **kwargs):
        assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in completions)
        return [len(c[0]["content"]) for c in completions]

    chat = [[{"role": "assistant", "content": "abc"}], [{"role": "assistant", "content": "de"}]]
    assert _call(needs_messages, completions=chat) == [3.0, 2.0]
    assert number_correct(chat, answer=["12", "2"]) == [0.0, 0.0]


def test_reference_000s_signature_gets_texts_and_the_run_context():
    """Reference 000's reward, `f(prompts: List[str], completions: List[str], labels: List[str], context: Dict =
    None)`, on chat prompts: the annotations ask for strings, so the texts come (the message lists made it fail on
    `completion.split()`), and `context` is the run context (it was always None). Unannotated, message lists."""
    from typing import Dict, List, Optional  # noqa: UP035 - as the reference writes them

    seen = {}

    def my_reward_func(prompts: List[str], completions: List[str], labels: List[str],  # noqa: UP006
                       context: Dict = None) -> List[float]:  # noqa: UP006
        seen.update(prompts=prompts, context=context)
        return [float(len(c.split()) == int(label)) for c, label in zip(completions, labels, strict=True)]

    def per_row(completion: str, answer):
        return float(completion.startswith("two"))

    def optional(completions: Optional[List[str]] = None, **kwargs):  # noqa: UP006, UP045
        return [float(c.startswith("two")) for c in completions]

    def union(completions: list[str] | None = None, **kwargs):
        return [float(c.startswith("two")) for c in completions]

    def untyped(prompts, completions, **kwargs):
        return [float(isinstance(c, list)) for c in completions]

    chat = [[{"role": "assistant", "content": "two words"}], [{"role": "assistant", "content": "three words here"}]]
    prompts = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say two words."}]] * 2
    batch = _batch(chat, answers=["2", "2"], prompts=prompts)
    assert RewardFunction.wrap("my", my_reward_func).invoke(batch) == [1.0, 0.0]
    assert seen == {"prompts": ["Say two words."] * 2, "context": {"max_completion_length": 16, "step": 3}}
    assert RewardFunction.wrap("row", per_row).invoke(batch) == [1.0, 0.0]
    assert RewardFunction.wrap("optional", optional).invoke(batch) == [1.0, 0.0]
    assert RewardFunction.wrap("union", union).invoke(batch) == [1.0, 0.0]
    from grpokit.rewards.contract import _annotated_text  # as `from __future__ import annotations` leaves them

    assert [_annotated_text(a) for a in ("List[str]", "Optional[List[str]]", "list[str] | None", "str", "int")] == [
        "list", "list", "list", "one", None]
    assert RewardFunction.wrap("untyped", untyped).invoke(batch) == [1.0, 1.0]


def test_number_correct_reads_gsm8k_solutions_as_published():
    """openai/gsm8k's `answer` column is a worked solution ending '#### N': its N is the reference (it used to be
    None, not applicable, for every row, so a GSM8K run trained on its format reward alone)."""
    solution = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
    completions = ["She sold 48 + 24 clips, so 72.", "In May she sold 24.", "Answer: 72", "no number"]
    assert number_correct(completions, answer=[solution] * 4) == [1.0, 0.0, 1.0, 0.0]
    assert number_correct(["so 1234", "so 1234"], answer=["x #### 1,234", "1,234"]) == [1.0, 1.0]
    assert number_correct(["7", "7"], answer=["seven", "#### seven"]) == [None, None]  # not a number


def test_class_with_config_parameters_from_a_config_entry(tmp_path):
    (tmp_path / "spec_rewards.py").write_text(
        "class KeywordReward:\n"
        "    def __init__(self, keyword, bonus=1.0):\n"
        "        self.keyword, self.bonus = keyword, bonus\n"
        "    def __call__(self, completions, **kwargs):\n"
        "        return [self.bonus if self.keyword in c else 0.0 for c in completions]\n")
    f = resolve_reward({"func": f"{tmp_path / 'spec_rewards.py'}:KeywordReward",
                        "args": {"keyword": "cat", "bonus": 2.5}, "name": "kw"})
    assert f.name == "kw" and f(["p", "p"], ["a cat", "a dog"], [[1], [1]], {"prompt": ["p", "p"]}) == [2.5, 0.0]
    with pytest.raises(RewardError, match="bad args.*KeywordReward.*'keyword', 'bonus'"):
        resolve_reward({"func": f"{tmp_path / 'spec_rewards.py'}:KeywordReward", "args": {"keywrd": "cat"}})


def test_function_args_are_fixed_keyword_arguments():
    def scaled(completions, scale=1.0, **kwargs):
        return [scale * len(c) for c in completions]

    f = resolve_reward({"func": scaled, "args": {"scale": 0.5}})
    assert f.name == "scaled" and f(["p"], ["abcd"], [[1]], {"prompt": ["p"]}) == [2.0]
    with pytest.raises(RewardError, match="not parameters of"):
        resolve_reward({"func": number_correct, "args": {"scale": 2}, "name": "nc"}.copy()
                       | {"func": lambda completions: []})


def test_compute_reward_objects_of_the_math_qa_trainer():
    class MyRewardModel:  # reference workflow 003: compute_reward(questions, answers, references) -> tensor
        def compute_reward(self, questions, answers, references):
            return torch.tensor([float(q == "q" and a == r) for q, a, r in zip(questions, answers, references)])

    f = resolve_reward(MyRewardModel())
    assert f.name == "MyRewardModel"
    chat = [[{"role": "assistant", "content": "1"}], [{"role": "assistant", "content": "2"}]]
    assert f(["q", "q"], chat, [[1], [1]], {"prompt": ["q", "q"], "answer": ["1", "1"]}) == [1.0, 0.0]


class EditSpec(RewardSpec):  # reference 001: a training-wizard RewardSpec with settings and its own metrics
    def __init__(self, scale=1.0):
        self.scale = scale

    def compute_reward(self, prompts, completions, **kwargs):
        hits = [float(a in c) for c, a in zip(completions, kwargs["answer"])]
        self.log_metrics({"hit_rate": sum(hits) / len(hits), "calls": 1.0})
        return [self.scale * h for h in hits]


@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_a_reward_spec_is_bound_by_name_and_its_logged_metrics_reach_the_step_metrics(isolation):
    f = resolve_reward({"func": EditSpec, "args": {"scale": 2.0}, "isolation": isolation})
    assert f.name == "EditSpec" and f.compute_reward and not f.per_sample
    with RewardRunner([f]) as runner:
        first = runner.score(_batch(["1", "no", "a 1", "x"]))
        runner.score(_batch(["1", "1"]))  # a second call in the same step: the step's mean
        metrics = runner.pop_metrics()
        assert first[:, 0].tolist() == [2.0, 0.0, 2.0, 0.0]
        assert metrics["rewards/EditSpec/hit_rate"] == pytest.approx((0.5 + 1.0) / 2)
        assert metrics["rewards/EditSpec/calls"] == 1.0
        runner.score(_batch(["no"]))
        assert runner.pop_metrics()["rewards/EditSpec/hit_rate"] == 0.0  # only what was logged since the last pop


def test_a_reward_spec_logging_a_reserved_or_non_numeric_metric_is_a_clear_error():
    class Bad(RewardSpec):
        def __init__(self, metric):
            self.metric = metric

        def compute_reward(self, prompts, completions, **kwargs):
            self.log_metrics(self.metric)
            return [0.0] * len(completions)

    for metric, message in (({"mean": 1.0}, "'mean' is not allowed"), ({"a/b": 1.0}, "'a/b' is not allowed"),
                            ({"f1": "high"}, "give a finite number"),
                            ({"f1": math.nan}, "give a finite number"), ([1.0], "takes a mapping")):
        f = resolve_reward({"func": Bad, "args": {"metric": metric}, "isolation": "inline"})
        with RewardRunner([f]) as runner, pytest.raises(RewardError, match=message):
            runner.score(_batch(["a"]))


def test_a_compute_reward_method_is_never_called_by_position():
    class KeywordOrder(RewardSpec):  # parameters in an order no positional call would match
        def compute_reward(self, completions, topic, prompts):
            return [float(c == "c" and t == "t" and p == "p") for c, t, p in zip(completions, topic, prompts)]

    class MathQA(RewardModel):  # reference 003's base class: questions, answers (the completions), references
        def compute_reward(self, questions, answers, references):
            return torch.tensor([float(q == "q" and a == r) for q, a, r in zip(questions, answers, references)])

    assert _call(KeywordOrder()) == [1.0, 1.0]
    chat = [[{"role": "assistant", "content": "1"}], [{"role": "assistant", "content": "2"}]]
    f = resolve_reward(MathQA())
    assert f.name == "MathQA"
    assert f(["q", "q"], chat, [[1], [1]], {"prompt": ["q", "q"], "answer": ["1", "1"]}) == [1.0, 0.0]
    class Unfinished(RewardSpec):
        pass

    with pytest.raises(RewardError, match=r"'Unfinished' subclasses grpokit.RewardSpec but does not implement "
                                          r"compute_reward\(self, prompts, completions, \*\*kwargs\)"):
        resolve_reward(Unfinished())


def test_a_function_named_after_one_completion_is_per_sample_without_the_decorator():
    def exact(generated, ground_truth):  # reference 004's binary reward, as written there
        return 1.0 if generated == ground_truth else 0.0

    def code(generated_code, test_cases):  # reference 004's code reward: test_cases binds to a `tests` column
        return sum(t in generated_code for t in test_cases) / len(test_cases)

    def batch_too(completion_ids, completions):  # first parameter not a completion name: a batch function
        return [float(len(c)) for c in completions]

    def both(response, completions):  # names all the completions too: stays a batch function
        return [0.0] * len(completions)

    assert RewardFunction.wrap("exact", exact).per_sample
    assert _call(exact, completions=["1", "2"], columns={"prompt": ["p", "p"], "ground_truth": ["1", "1"]}) == [1.0,
                                                                                                                0.0]
    tests = {"prompt": ["p", "p"], "tests": [["ab", "cd"], ["ab", "zz"]]}
    assert _call(code, completions=["abcd", "abcd"], columns=tests) == [1.0, 0.5]
    assert not RewardFunction.wrap("batch_too", batch_too).per_sample
    assert not RewardFunction.wrap("both", both).per_sample


def test_async_functions_run_and_per_sample_ones_run_concurrently():
    async def batch_async(completions, **kwargs):
        await asyncio.sleep(0)
        return [1.0] * len(completions)

    in_flight = {"now": 0, "max": 0}

    @per_sample
    async def judge(completion, answer):
        in_flight["now"] += 1
        in_flight["max"] = max(in_flight["max"], in_flight["now"])
        await asyncio.sleep(0.01)
        in_flight["now"] -= 1
        return float(in_flight["max"])  # how many were in flight at once by the time this one finished

    batch = _batch(["a"] * 6)
    with _runner(batch_async, judge) as runner:
        matrix = runner.score(batch)  # in the worker processes, as in training
    assert matrix[:, 0].tolist() == [1.0] * 6
    assert matrix[:, 1].max().item() == 6.0  # all six awaited at once


def test_none_and_nan_become_not_applicable_and_tensors_are_accepted():
    def partial(completions, **kwargs):
        return [None, float("nan")]

    def tensor_reward(completions, **kwargs):
        return torch.tensor([0.25, 0.75])

    assert all(math.isnan(v) for v in _call(partial))
    assert _call(tensor_reward) == [0.25, 0.75]


@pytest.mark.parametrize(("result", "message"), [
    ([1.0], "returned 1 values for 2 completions"),
    (3.0, "returned float"),
    (["a", "b"], "returned str"),
    ({"a": 1}, "returned dict"),
])
def test_wrong_length_or_type_names_the_function(result, message):
    def bad_reward(completions, **kwargs):
        return result

    with pytest.raises(RewardError, match=f"'bad_reward' {message}"):
        _call(bad_reward)
    with _runner(bad_reward) as runner, pytest.raises(RewardError, match=f"'bad_reward' {message}"):
        runner.score(_batch(["a", "b"]))


def test_argument_matching_no_column_is_a_clear_error():
    def needs_missing(completions, difficulty):
        return [0.0, 0.0]

    with pytest.raises(RewardError, match="needs argument 'difficulty'.*columns"):
        RewardFunction.wrap("needs_missing", needs_missing).check_columns(["prompt", "topic"])


def test_resolve_builtin_file_and_dotted(tmp_path, monkeypatch):
    assert resolve_reward("number_correct").fn is number_correct
    (tmp_path / "resolve_test_rewards.py").write_text("def short(completions, **kw):\n"
                                                      "    return [-len(c) for c in completions]\n")
    by_file = resolve_reward(f"{tmp_path / 'resolve_test_rewards.py'}:short")
    monkeypatch.chdir(tmp_path)
    by_module = resolve_reward("resolve_test_rewards.short")
    for f in (by_file, by_module):
        assert f.name == "short" and f(["p"], ["abc"], [[1]], {"prompt": ["p"]}) == [-3.0]


def test_unknown_and_duplicate_rewards_are_clear_errors():
    with pytest.raises(RewardError, match="did you mean 'number_correct'"):
        resolve_reward("number_corect")
    with pytest.raises(RewardError, match="more than one reward named \\['number_correct'\\].*name:"):
        resolve_rewards(["number_correct", "number_correct"])
    with pytest.raises(RewardError, match=r"reward name\(s\) \['acc/v2'\] are not allowed"):
        resolve_rewards([{"func": "number_correct", "name": "acc/v2"}])


def test_score_matrix_shape_and_order():
    funcs = resolve_rewards(["number_correct", "answer_format"])
    matrix = score(funcs, ["p", "p"], ["Answer: 3", "4"], [[1], [2]], {"prompt": ["p", "p"], "answer": ["3", "3"]})
    assert matrix.tolist() == [[1.0, 1.0], [0.0, 0.0]]


# ---- the runner: workers, timeouts, failures ------------------------------------------------------

def fails_on_bad(completions, **kwargs):
    return [1.0 if c != "bad" else 1 / 0 for c in completions]


def test_a_raising_reward_loses_only_the_failing_completions(tmp_path, caplog):
    log_file = tmp_path / "reward_errors.jsonl"
    with _runner(fails_on_bad, error_rate_limit=0.5, error_log=log_file) as runner, caplog.at_level(logging.WARNING):
        matrix = runner.score(_batch(["ok", "bad", "ok", "ok"]))
        metrics = runner.pop_metrics()
    assert matrix[:, 0].tolist()[0] == 1.0 and math.isnan(matrix[1, 0]) and matrix[2:, 0].tolist() == [1.0, 1.0]
    assert metrics["rewards/fails_on_bad/errors"] == 1.0 and metrics["rewards/fails_on_bad/missing"] == 0.25
    assert "reward 'fails_on_bad' failed on completion 1: ZeroDivisionError" in caplog.text and "'bad'" in caplog.text
    record = json.loads(log_file.read_text())
    assert record["completion"] == "bad" and record["kind"] == "error" and "ZeroDivisionError" in record["traceback"]
    assert record["row"]["answer"] == "1" and record["step"] == 3


def test_failures_above_the_error_rate_limit_stop_with_a_clear_error():
    with _runner(fails_on_bad, error_rate_limit=0.1) as runner:
        runner.score(_batch(["ok"] * 15 + ["bad"]))  # 1 in 16: under the limit, and too few to judge yet
        with pytest.raises(RewardError, match=r"'fails_on_bad' failed on 4 of 32 completions.*ZeroDivisionError.*"
                                              r"reward_error_rate_limit"):
            runner.score(_batch(["bad"] * 3 + ["ok"] * 13))  # 4 in 32 > 10%
    with _runner(fails_on_bad, error_rate_limit=0.1) as runner, pytest.raises(RewardError, match="failed on 4 of 4"):
        runner.score(_batch(["bad"] * 4))  # every completion failed: no need to wait for 32


def test_a_restored_runner_stops_where_the_uninterrupted_one_does():
    """The error-rate limit counts over the whole run: a checkpoint's `state()` (JSON round trip) carries the counts,
    so a resumed run stops at the same call, where a fresh runner would go on."""
    first, second, third = ["ok"] * 15 + ["bad"], ["ok"] * 14 + ["bad"] * 2, ["bad"] * 2 + ["ok"] * 14
    with _runner(fails_on_bad, error_rate_limit=0.1) as straight:
        straight.score(_batch(first))
        straight.score(_batch(second))  # 3 of 32: under 10%
        saved = json.loads(json.dumps(straight.state()))
        with pytest.raises(RewardError, match="failed on 5 of 48"):
            straight.score(_batch(third))
    assert saved["stats"]["fails_on_bad"]["scored"] == 32 and saved["stats"]["fails_on_bad"]["failures"] == 3
    with _runner(fails_on_bad, error_rate_limit=0.1) as resumed:
        resumed.restore(saved)
        assert resumed.state() == saved
        with pytest.raises(RewardError, match="failed on 5 of 48"):
            resumed.score(_batch(third))
    with _runner(fails_on_bad, error_rate_limit=0.1) as fresh:
        fresh.restore(None)
        assert torch.isnan(fresh.score(_batch(third))[:2, 0]).all()  # 2 of 16: too few to judge, the run goes on


def hangs(completions, **kwargs):
    time.sleep(10)
    return [1.0] * len(completions)


def quick(completions, **kwargs):
    return [float(len(c)) for c in completions]


def test_a_hanging_reward_is_killed_at_its_timeout_and_the_step_goes_on():
    with _runner(hangs, quick, timeout=1.0, error_rate_limit=1.0) as runner:
        started = time.monotonic()
        matrix = runner.score(_batch(["a", "bb"]))
        elapsed = time.monotonic() - started
        metrics = runner.pop_metrics()
        assert elapsed < 5.0, elapsed  # FAULTS.md row 2: a 10 s function under a 1 s limit
        assert torch.isnan(matrix[:, 0]).all() and matrix[:, 1].tolist() == [1.0, 2.0]
        assert metrics["rewards/hangs/timeouts"] == 2.0 and metrics["rewards/hangs/missing"] == 1.0
        assert runner.score(_batch(["ccc"]))[0, 1].item() == 3.0  # the restarted workers keep working


def test_timeouts_work_from_a_non_main_thread_and_count_toward_the_limit():
    errors = []

    def run():
        with _runner(hangs, timeout=0.5, error_rate_limit=0.1) as runner:
            try:
                runner.score(_batch(["a", "b"]))
            except RewardError as exc:
                errors.append(str(exc))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=8)
    assert not thread.is_alive()
    assert errors and "'hangs' failed on 2 of 2 completions so far (0 errors, 2 timeouts)" in errors[0]
    assert "reward_timeout=0.5s" in errors[0]


@per_sample
def hangs_on_one(completion):
    if completion == "slow":
        time.sleep(10)
    return float(len(completion))


def test_a_per_sample_timeout_loses_only_that_completion():
    with _runner(hangs_on_one, timeout=0.5, error_rate_limit=1.0) as runner:
        started = time.monotonic()
        matrix = runner.score(_batch(["a", "slow", "ccc", "dd"]))
        assert time.monotonic() - started < 5.0
    values = matrix[:, 0].tolist()
    assert values[0] == 1.0 and math.isnan(values[1]) and values[2:] == [3.0, 2.0]


def dies(completions, **kwargs):
    if "die" in completions:
        os._exit(3)
    return [1.0] * len(completions)


def returns_inf(completions, **kwargs):
    return [math.inf if c == "x" else 0.5 for c in completions]


def test_a_dying_worker_and_an_infinite_reward_are_counted_failures(caplog):
    with _runner(dies, returns_inf, error_rate_limit=1.0) as runner, caplog.at_level(logging.WARNING):
        matrix = runner.score(_batch(["ok", "die", "x"]))
        metrics = runner.pop_metrics()
    assert matrix[0, 0].item() == 1.0 and math.isnan(matrix[1, 0]) and matrix[2, 0].item() == 1.0
    assert matrix[:2, 1].tolist() == [0.5, 0.5] and math.isnan(matrix[2, 1])
    assert metrics["rewards/dies/errors"] == 1.0 and metrics["rewards/returns_inf/errors"] == 1.0
    assert "worker process died (exit code 3)" in caplog.text and "returned inf" in caplog.text


def test_expensive_rewards_score_identical_pairs_once(tmp_path):
    calls = tmp_path / "calls.txt"

    def costly(prompts, completions, **kwargs):
        with calls.open("a") as out:  # the worker is another process: count calls through a file
            out.write(f"{len(completions)}\n")
        return [float(len(c)) for c in completions]

    f = resolve_reward({"func": costly, "cache": True})
    with RewardRunner([f]) as runner:
        first = runner.score(_batch(["a", "bb", "a", "a"]))
        second = runner.score(_batch(["bb", "ccc"]))
        metrics = runner.pop_metrics()
    assert first[:, 0].tolist() == [1.0, 2.0, 1.0, 1.0] and second[:, 0].tolist() == [2.0, 3.0]
    assert calls.read_text().split() == ["4", "1"]  # 'bb' the second time came from the cache
    assert metrics["rewards/costly/cache_hits"] == 1.0


def test_process_rewards_run_in_a_worker_and_inline_ones_here():
    def where(completions, **kwargs):
        return [float(os.getpid())] * len(completions)

    process = RewardFunction.wrap("process", where)
    inline = RewardFunction.wrap("inline", where, isolation="inline")
    with RewardRunner([process, inline]) as runner:
        matrix = runner.score(_batch(["a"]))
    assert matrix[0, 1].item() == os.getpid() and matrix[0, 0].item() != os.getpid()


def test_a_reward_that_never_applies_is_warned_about_once(caplog):
    def never(completions, **kwargs):
        return [None] * len(completions)

    with _runner(never) as runner, caplog.at_level(logging.WARNING):
        runner.score(_batch(["a", "b"]))
        runner.score(_batch(["c"]))
        metrics = runner.pop_metrics()
    assert caplog.text.count("reward 'never' returned None (not applicable) for all 2 completions") == 1
    assert metrics["rewards/never/missing"] == 1.0 and metrics["rewards/never/errors"] == 0.0


def test_a_reward_module_that_fails_to_load_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "broken_syntax.py").write_text("def fn(:\n")
    (tmp_path / "broken_import_time.py").write_text("raise RuntimeError('no config file')\n")
    with pytest.raises(RewardError, match=r"loading '.*broken_syntax.py' .*failed: SyntaxError: .*line 1\)"):
        resolve_reward(f"{tmp_path / 'broken_syntax.py'}:fn")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RewardError,
                       match="importing module 'broken_import_time' .*failed: RuntimeError: no config file"):
        resolve_reward("broken_import_time.fn")


def test_a_reward_class_refusing_its_settings_is_a_clear_error():
    with pytest.raises(RewardError,
                       match=r"reward 'length': Length\(\*\*\{\}\) failed: ValueError: length: give a target"):
        resolve_reward("length")


def test_a_reward_that_treats_chat_completions_as_strings_gets_a_fix_in_the_dry_run():
    from grpokit.evaluation.preflight import PreflightReport, _problem

    report = PreflightReport()
    _problem(report, True, "chat", "2 of 2 failed: reward function 'f' raised AttributeError: 'list' object has no "
                                   "attribute 'split'")
    assert report.problems == 1 and "fix: chat prompts give completions (and prompts) as message lists" in \
        report.lines[0] and "`completions: List[str]`" in report.lines[0]
