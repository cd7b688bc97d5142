"""Held-out evaluation (evaluation/evaluate.py) on a scripted engine and a character tokenizer: greedy
accuracy and reward means, pass@k / maj@k from samples, per-prompt values, shards merged as one, compare."""

from __future__ import annotations

import math

import pytest

from grpokit.data.loading import TokenisedPrompts
from grpokit.evaluation.evaluate import compare, evaluate_per_prompt, merge_results
from grpokit.rewards import RewardFunction, RewardRunner
from grpokit.rollout.base import Rollout, SamplingParams

# prompt -> (greedy completion, 4 sampled completions); the answers are 2, 4 and 6
SCRIPT = {"1+1": ("2", ["2", "3", "2", "2"]),
          "2+2": ("5555555555", ["4", "5", "5", "5"]),  # greedy: wrong, and cut off at max_tokens 8
          "3+3": ("6", ["7", "7", "7", "7"])}
RECORDS = [{"prompt": p, "answer": str(2 * int(p[0]))} for p in SCRIPT]


class _Tokenizer:
    def batch_decode(self, ids: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        return ["".join(map(chr, row)) for row in ids]


class _Engine:
    """Plays SCRIPT back: greedy (temperature 0) the first completion, sampled the next n of each prompt."""

    def __init__(self):
        self.calls: list[tuple[int, int, SamplingParams]] = []

    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> Rollout:
        self.calls.append((len(prompt_ids), n, params))
        rows = []
        for ids in prompt_ids:
            greedy, sampled = SCRIPT["".join(map(chr, ids))]
            rows += [greedy] if params.temperature == 0 else sampled[:n]
        ids = [[ord(ch) for ch in text[:params.max_tokens]] for text in rows]
        return Rollout(completion_ids=ids, sampler_logps=[[0.0] * len(r) for r in ids],
                       finish_reasons=["length" if len(t) > params.max_tokens else "stop" for t in rows], group_size=n)


def correct(completions, answer, **kwargs):
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer, strict=True)]


def length(completions, **kwargs):
    return [float(len(c)) for c in completions]


def not_on_three(completions, prompts, **kwargs):
    """Not applicable (None) on the prompt 3+3."""
    return [None if p == "3+3" else 1.0 for p in prompts]


def _data(records=RECORDS) -> TokenisedPrompts:
    return TokenisedPrompts(records=records, prompt_ids=[[ord(ch) for ch in r["prompt"]] for r in records], dropped=0)


def _evaluate(data=None, engine=None, **kwargs):
    runner = RewardRunner([RewardFunction.wrap(f.__name__, f) for f in (correct, length, not_on_three)])
    sampling = SamplingParams(max_tokens=8, temperature=1.0, seed=0)
    return evaluate_per_prompt(engine or _Engine(), _Tokenizer(), data or _data(), runner, "correct", 8, [0],
                               sampling=sampling, **kwargs)


def test_greedy_accuracy_reward_means_and_lengths():
    engine = _Engine()
    result = _evaluate(engine=engine, batch_size=2, stop=["\n"])
    m = result.metrics
    assert (m["eval/accuracy"], m["eval/num_correct"], m["eval/num_prompts"]) == (pytest.approx(2 / 3), 2.0, 3.0)
    assert m["eval/rewards/correct/mean"] == pytest.approx(2 / 3)
    assert m["eval/rewards/length/mean"] == pytest.approx((1 + 8 + 1) / 3)
    assert m["eval/rewards/not_on_three/mean"] == 1.0  # the mean over the two prompts it applies to
    assert m["eval/completions/mean_length"] == pytest.approx(10 / 3)
    assert m["eval/completions/clipped_ratio"] == pytest.approx(1 / 3)
    assert result.per_prompt["eval/accuracy"] == [1.0, 0.0, 1.0]
    assert math.isnan(result.per_prompt["eval/rewards/not_on_three/mean"][2])
    assert not any(k.startswith("eval/pass@") for k in m)  # no samples asked for
    # greedy, with the stop strings, about batch_size completions per engine call
    assert [(prompts, n) for prompts, n, _ in engine.calls] == [(2, 1), (1, 1)]
    params = engine.calls[0][2]
    assert (params.temperature, params.stop, params.max_tokens, params.stop_token_ids) == (0.0, ["\n"], 8, [0])


def test_pass_and_majority_at_k_from_samples():
    result = _evaluate(num_samples=4, pass_k=(1, 2, 4))
    m = result.metrics
    # correct samples: 3 of 4 on 1+1, 1 of 4 on 2+2, none on 3+3
    assert m["eval/pass@1"] == pytest.approx((3 / 4 + 1 / 4 + 0) / 3)
    assert result.per_prompt["eval/pass@2"] == pytest.approx([1.0, 1 - 3 / 6, 0.0])  # 1 - C(n - c, 2) / C(4, 2)
    assert m["eval/pass@4"] == pytest.approx(2 / 3)
    assert result.per_prompt["eval/maj@4"] == [1.0, 0.0, 0.0]  # the most frequent answers: 2 (right), 5, 7
    assert m["eval/sampled/rewards/correct/mean"] == pytest.approx((3 / 4 + 1 / 4 + 0) / 3)
    assert m["eval/sampled/completions/mean_length"] == 1.0 and m["eval/sampled/completions/clipped_ratio"] == 0.0
    assert m["eval/accuracy"] == pytest.approx(2 / 3)  # the greedy metrics are unchanged by sampling


def test_samples_need_sampling_params_and_a_known_accuracy_reward():
    runner = RewardRunner([RewardFunction.wrap("correct", correct)])
    with pytest.raises(ValueError, match="needs the sampling params"):
        evaluate_per_prompt(_Engine(), _Tokenizer(), _data(), runner, "correct", 8, [0], num_samples=2)
    with pytest.raises(ValueError, match="accuracy reward 'nope' is not one of the rewards"):
        evaluate_per_prompt(_Engine(), _Tokenizer(), _data(), runner, "nope", 8, [0], num_samples=2,
                            sampling=SamplingParams(max_tokens=8))


def test_shards_merged_equal_one_evaluation():
    whole = _evaluate(num_samples=4, pass_k=(1, 4))
    parts = [_evaluate(data=_data(RECORDS[:1]), num_samples=4, pass_k=(1, 4)),
             _evaluate(data=_data(RECORDS[1:]), num_samples=4, pass_k=(1, 4))]
    merged = merge_results(parts)
    assert merged.metrics.keys() == whole.metrics.keys()
    for key, value in whole.metrics.items():
        assert merged.metrics[key] == pytest.approx(value, nan_ok=True), key
    assert merged.per_prompt.keys() == whole.per_prompt.keys()
    for key, values in whole.per_prompt.items():
        assert merged.per_prompt[key] == pytest.approx(values, nan_ok=True), key


def test_compare_gives_differences_and_intervals_over_prompts():
    a = _evaluate()
    b = _evaluate()
    b.metrics["eval/accuracy"], b.per_prompt["eval/accuracy"] = 1.0, [1.0, 1.0, 1.0]
    rows = compare(a, b)
    assert list(rows) == list(a.metrics)
    assert rows["eval/accuracy"]["difference"] == pytest.approx(1 / 3)
    low, high = rows["eval/accuracy"]["ci95"]
    assert 0.0 <= low <= 1 / 3 <= high <= 1.0
    assert rows["eval/num_prompts"]["ci95"] is None and rows["eval/num_prompts"]["difference"] == 0.0
    with pytest.raises(ValueError, match="different numbers of prompts"):
        compare(a, _evaluate(data=_data(RECORDS[:2])))
