"""`grpokit eval --compare` of two tiny models, `grpokit filter` by pass rate, and sampled evaluation during
training."""

import importlib.util
import json

import pytest

from grpokit.config import load_config
from grpokit.evaluation.inference import generate
from tests.conftest import build_tiny_model, run_cli, write_jsonl

COMMON = ["--set", "max_completion_length=6", "--set", "device=cpu", "--set", "output_dir=run"]

REWARD_MODULE = '''
def first_odd(completions, **kwargs):
    """1 when the completion's first character has an odd code: a coin a random model flips."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(bool(t) and ord(t[0]) % 2 == 1) for t in texts]


def by_kind(completions, kind, **kwargs):
    """Always right, always wrong, or `first_odd`."""
    return [1.0 if k == "right" else 0.0 if k == "wrong" else odd
            for odd, k in zip(first_odd(completions), kind, strict=True)]
'''


@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-seed1")
    model, tokenizer = build_tiny_model(seed=1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_eval_compare_two_models(tmp_path, tiny_model_dir, second_model_dir):
    (tmp_path / "coin.py").write_text(REWARD_MODULE)
    write_jsonl(tmp_path / "qa.jsonl", [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)}
                                        for a in range(3) for b in range(2)])
    result = run_cli("eval", "--model", str(tiny_model_dir), "--data", "qa.jsonl",
                     "--rewards", "coin.py:first_odd,number_correct",
                     "--samples", "4", "--k", "1,4", "--limit", "5", "--compare", str(second_model_dir),
                     "--output", "cmp.json", *COMMON, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert str(tiny_model_dir) in result.stdout and str(second_model_dir) in result.stdout
    out = json.loads((tmp_path / "cmp.json").read_text())
    a, b = out["model_a"]["metrics"], out["model_b"]["metrics"]
    assert out["model_a"]["model"] == str(tiny_model_dir) and out["model_b"]["model"] == str(second_model_dir)
    expected = {"eval/accuracy", "eval/pass@1", "eval/pass@4", "eval/maj@1", "eval/maj@4",
                "eval/rewards/number_correct/mean", "eval/rewards/first_odd/mean",
                "eval/sampled/rewards/number_correct/mean", "eval/completions/mean_length",
                "eval/completions/clipped_ratio", "eval/sampled/completions/mean_length"}
    assert expected <= a.keys() and a.keys() == b.keys() == out["difference"].keys()
    assert a["eval/num_prompts"] == b["eval/num_prompts"] == 5
    table = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith("eval/")}
    assert table.keys() == a.keys()
    for key, row in out["difference"].items():
        assert row["a"] == a[key] and row["b"] == b[key]
        assert row["difference"] == pytest.approx(b[key] - a[key], abs=1e-12)
        assert float(table[key][1]) == pytest.approx(a[key], rel=1e-3, abs=1e-6)
        assert float(table[key][2]) == pytest.approx(b[key], rel=1e-3, abs=1e-6)
        assert float(table[key][3]) == pytest.approx(b[key] - a[key], rel=1e-3, abs=1e-6)
        if key in ("eval/num_prompts", "eval/num_correct"):
            assert row["ci95"] is None
        else:  # the interval of a mean difference holds the observed difference
            low, high = row["ci95"]
            assert low - 1e-9 <= row["difference"] <= high + 1e-9, key
    assert 0.0 <= a["eval/pass@1"] <= a["eval/pass@4"] <= 1.0
    assert any(row["difference"] != 0 for row in out["difference"].values())  # the models differ; B - A was checked


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_filter_keeps_mixed_prompts_and_trains(tmp_path, tiny_model_dir):
    (tmp_path / "coin.py").write_text(REWARD_MODULE)
    kinds = ["right", "wrong", "mixed", "right", "mixed", "wrong", "mixed", "mixed"]
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}: {i} + {i}?"}], "answer": str(2 * i), "kind": k}
            for i, k in enumerate(kinds)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    # absolute paths: the same settings load in this process (cwd: the repo) for the cross-check below
    settings = ["--set", f"model={tiny_model_dir}", "--set", f"dataset={tmp_path / 'train.jsonl'}",
                "--set", f"reward_funcs=[{tmp_path / 'coin.py'}:by_kind]", "--set", "temperature=1.5",
                "--set", "max_completion_length=6", "--set", "device=cpu", "--set", f"output_dir={tmp_path / 'run'}"]
    result = run_cli("filter", *settings, "--samples", "6", "--output", "kept.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    # the same samples, drawn in this process (same seed and sampling settings), scored by the same function
    spec = importlib.util.spec_from_file_location("coin", tmp_path / "coin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = load_config(None, [s for s in settings if s != "--set"])
    samples = generate(cfg, 6, None)
    expected = []
    for i, row in enumerate(rows):
        mine = samples[6 * i:6 * i + 6]
        assert all(s["prompt"] == row["prompt"] for s in mine)
        expected.append(sum(module.by_kind([s["completion"] for s in mine], [row["kind"]] * 6)) / 6)
    assert [expected[i] for i, k in enumerate(kinds) if k == "right"] == [1.0, 1.0]
    assert [expected[i] for i, k in enumerate(kinds) if k == "wrong"] == [0.0, 0.0]
    mixed = [r for r in expected if 0.0 < r < 1.0]
    assert mixed, "the sampler gave no prompt a mixed outcome; the test data needs another rule"

    kept = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "pass_rate"} for r in kept] == \
        [row for row, rate in zip(rows, expected, strict=True) if 0.0 < rate < 1.0]
    assert [r["pass_rate"] for r in kept] == pytest.approx(mixed, abs=1e-12)
    assert all(isinstance(r["prompt"], list) for r in kept)  # chat prompts stay message lists
    all_correct, all_wrong = expected.count(1.0), expected.count(0.0)
    assert f"{all_correct} all correct, {all_wrong} all wrong" in result.stdout
    assert f"wrote {len(kept)} kept rows" in result.stdout

    # the kept rows train, and sampled evaluation during the run logs pass@k / maj@k
    result = run_cli("train", *settings, "--set", "dataset=kept.jsonl", "--set", "eval_dataset=train.jsonl",
                     "--set", "max_steps=1", "--set", "num_generations=2", "--set", "per_device_train_batch_size=2",
                     "--set", "eval_num_samples=2", "--set", "eval_pass_k=[1,2]", "--set", "eval_limit=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    logged = {}
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        logged.update(json.loads(line))
    for key in ("eval/pass@1", "eval/maj@1", "eval/pass@2", "eval/maj@2", "eval/sampled/rewards/by_kind/mean"):
        assert key in logged and 0.0 <= logged[key] <= 1.0, key
    assert logged["eval/pass@1"] <= logged["eval/pass@2"]


def test_filter_keep_all_writes_every_row(tmp_path, tiny_model_dir):
    (tmp_path / "coin.py").write_text(REWARD_MODULE)
    rows = [{"prompt": f"Q{i}?", "kind": k} for i, k in enumerate(["right", "wrong", "mixed"])]
    write_jsonl(tmp_path / "train.jsonl", rows)
    result = run_cli("filter", "--set", f"model={tiny_model_dir}", "--set", "dataset=train.jsonl",
                     "--set", "reward_funcs=[coin.py:by_kind]", *COMMON, "--samples", "3", "--keep-all",
                     "--output", "all.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    kept = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in kept] == ["right", "wrong", "mixed"]
    assert kept[0]["pass_rate"] == 1.0 and kept[1]["pass_rate"] == 0.0 and kept[2]["pass_rate"] in (0, 1 / 3, 2 / 3, 1)


@pytest.mark.slow  # over 10 s: the slow target (make test-slow; CI runs both)
def test_eval_flags_errors(tmp_path):
    result = run_cli("eval", "--data", "x.jsonl", "--k", "2", cwd=tmp_path)
    assert result.returncode == 2 and "--samples" in result.stderr
    result = run_cli("filter", "--samples", "1", "--output", "x.jsonl", cwd=tmp_path)
    assert result.returncode == 2 and "--samples must be >= 2" in result.stderr
