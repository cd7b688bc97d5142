"""benchmarks/learning.py's reading of a finished run: paired counts, intervals, entropy and zero spread over time."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("learning", ROOT / "benchmarks" / "learning.py")
learning = importlib.util.module_from_spec(spec)
spec.loader.exec_module(learning)


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_seed_result_counts_fixed_and_broken_prompts_and_the_second_half(tmp_path):
    before = [0.0, 0.0, 1.0, 1.0, None, 0.0]
    after = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    _write(tmp_path / "evaluations.jsonl", [{"step": 0, "label": "before training", "accuracy": before},
                                            {"step": 4, "label": "after training", "accuracy": after}])
    steps = [{"step": i, "loss": 0.1, "entropy": e, "frac_reward_zero_std": z, "step_time": 2.0}
             for i, (e, z) in enumerate([(1.0, 0.0), (0.8, 0.5), (0.4, 0.5), (0.2, 1.0)], 1)]
    _write(tmp_path / "metrics.jsonl", [{"step": 0, "eval/accuracy": 0.4}, *steps])
    r = learning.seed_result(tmp_path)
    assert r["steps"] == 4 and r["train_seconds"] == 8.0
    assert (r["before"]["right"], r["before"]["scored"]) == (2, 5) and (r["after"]["right"], r["after"]["scored"]) == (
        4, 6)
    assert r["gain_points"] == pytest.approx(100 * (4 / 6 - 2 / 5))
    assert (r["fixed"], r["broken"]) == (2, 1)  # prompt 4 was not scored before: not a pair
    assert r["entropy_second_half"] == pytest.approx(0.3) and r["zero_spread_second_half"] == pytest.approx(0.75)
    assert r["before"]["ci95"] == pytest.approx(list(learning.wilson_interval(2, 5)))
    assert r["entropy_by_tenth"].count(None) == 6  # 4 steps spread over 10 tenths


def test_with_dynamic_sampling_the_trained_fraction_counts_the_groups_kept_and_validation_lines_are_skipped(
        tmp_path):
    _write(tmp_path / "evaluations.jsonl", [
        {"step": 0, "label": "before training", "split": "eval", "accuracy": [0.0, 1.0]},
        {"step": 0, "label": "before training", "split": "validation", "accuracy": [1.0, 1.0, 1.0]},
        {"step": 2, "label": "after training", "split": "eval", "accuracy": [1.0, 1.0]}])
    (tmp_path / "config.yaml").write_text("num_generations: 4\nper_device_train_batch_size: 16\n")  # 4 groups
    steps = [{"step": i, "loss": 0.1, "frac_reward_zero_std": 0.5, "dynamic_sampling/zero_spread_groups_kept": k}
             for i, k in enumerate([0.0, 0.0, 1.0, 3.0], 1)]
    _write(tmp_path / "metrics.jsonl", steps)
    r = learning.seed_result(tmp_path)
    assert r["before"]["scored"] == 2 and r["gain_points"] == pytest.approx(50.0)
    assert r["zero_spread_second_half"] == pytest.approx(0.5)  # every group sampled
    assert r["trained_zero_spread_second_half"] == pytest.approx((1 / 4 + 3 / 4) / 2)  # of 4 trained on


def test_summary_and_table_name_the_worst_seed(tmp_path):
    def seed(gain, zero):
        acc = {"accuracy": 0.5, "right": 1, "scored": 2, "ci95": [0.1, 0.9]}
        return {"steps": 10, "before": acc, "after": acc, "gain_points": gain, "fixed": 1, "broken": 0,
                "entropy_second_half": 0.5, "zero_spread_second_half": zero}

    seeds = {"0": seed(12.0, 0.2), "1": seed(-3.0, 0.4)}
    s = learning.summary(seeds)
    assert s["mean_gain_points"] == pytest.approx(4.5) and s["worst_gain_points"] == -3.0
    assert s["seeds_below_untrained"] == 1 and s["mean_zero_spread_second_half"] == pytest.approx(0.3)
    text = learning.table({"seeds": seeds, "summary": s})
    assert "| 1 | 10 |" in text and "worst -3.0" in text and "1 seed(s) below the untrained model" in text


def test_a_run_without_held_out_data_is_a_clear_error(tmp_path):
    _write(tmp_path / "evaluations.jsonl", [])
    _write(tmp_path / "metrics.jsonl", [])
    with pytest.raises(SystemExit, match="needs an eval_dataset"):
        learning.seed_result(tmp_path)


def test_a_config_without_held_out_data_fails_before_any_run(tmp_path):
    (tmp_path / "cfg.yaml").write_text("dataset: arithmetic\n")
    with pytest.raises(SystemExit, match="has no eval_dataset"):
        learning.check_config(str(tmp_path / "cfg.yaml"), [])
    with pytest.raises(SystemExit, match="(?s)learning.py: .*no_such_key"):
        learning.check_config(str(tmp_path / "cfg.yaml"), ["no_such_key=1"])


def test_a_config_the_trainer_s_early_checks_refuse_fails_before_any_run(tmp_path):
    (tmp_path / "cfg.yaml").write_text("dataset: no_such_rows.jsonl\neval_dataset: arithmetic:held_out?eval_size=5\n"
                                       "report_to: none\n")
    with pytest.raises(SystemExit, match="(?s)--dry-run refused the config.*no_such_rows.jsonl"):
        learning.check_config(str(tmp_path / "cfg.yaml"), [])
