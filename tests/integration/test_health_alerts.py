"""Health alerts in a real run: every completion cut off at max_completion_length raises the truncation alert
once, on the console and in OUTPUT_DIR/alerts.jsonl."""

import json

import yaml

from tests.conftest import run_cli, write_jsonl


def test_truncated_completions_alert_fires_once_in_a_real_run(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"{a} + {b} ="} for a in range(4) for b in range(4)])
    config = {"model": str(tiny_model_dir), "dataset": "train.jsonl", "output_dir": "run", "device": "cpu",
              "reward_funcs": ["answer_format"], "num_generations": 2, "per_device_train_batch_size": 2,
              "max_completion_length": 2, "max_steps": 14, "save_steps": None, "seed": 0}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("train", "cfg.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(": truncated_completions") == 1, result.stderr
    alerts = [json.loads(line) for line in (tmp_path / "run" / "alerts.jsonl").read_text().splitlines()]
    truncated = [a for a in alerts if a["name"] == "truncated_completions"]
    assert len(truncated) == 1 and truncated[0]["step"] == 10  # the first full 10-step window
    assert "max_completion_length" in truncated[0]["fix"]
