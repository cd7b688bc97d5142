"""benchmarks/vs_trl.py: the floor of a step (weight reads for the decode, 6 FLOP per weight and token for the
update), and which grpokit its runs import."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("vs_trl", ROOT / "benchmarks" / "vs_trl.py")
vs_trl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(vs_trl)

FLOORS = {"file": "floors.json", "weights": 1000, "head_weights": 400, "read_bandwidth_gbs": 2e-6,
          "gemm_gflops": 3e-6, "bytes_per_weight": 4}  # 2,000 bytes/s and 3,000 FLOP/s: easy figures by hand


def test_step_floor_is_reads_of_the_longest_completion_plus_the_training_rows_flop():
    step = {"max_length": 10, "mean_length": 5.0, "zero_spread": 0.0}
    # decode: 10 passes x 1000 weights x 4 bytes / 2000 B/s = 20 s; update: 6 x (8 x 5 x 1000 + 7 x 600) FLOP
    # (completions through every weight, the prompt once and without the head) / 3000 FLOP/s = 88.4 s
    assert vs_trl.step_floor(step, FLOORS, prompt_tokens=7, groups=1, group_size=8) == pytest.approx(20 + 88.4)


def test_step_floor_counts_only_groups_with_reward_spread():
    silent = {"max_length": 10, "mean_length": 5.0, "zero_spread": 1.0}
    assert vs_trl.step_floor(silent, FLOORS, prompt_tokens=7, groups=1, group_size=8) == pytest.approx(20.0)
    half = {"max_length": 10, "mean_length": 5.0, "zero_spread": 0.5}
    assert vs_trl.step_floor(half, FLOORS, prompt_tokens=7, groups=2, group_size=8) == pytest.approx(20 + 88.4)


def _floors_file(tmp_path: Path, model: str = "smollm2-135m-instruct") -> Path:
    path = tmp_path / "floors.json"
    path.write_text(json.dumps({"model": model, "weights": 1000, "read_bandwidth_gbs": 2e-6,
                                "gemm_gflops": {"float32": 3e-6, "bf16": 6e-6}}))
    return path


@pytest.mark.parametrize("text", [None, "not json", "{}", '{"weights": 1, "read_bandwidth_gbs": 2, "gemm_gflops": 3}'])
def test_a_file_that_is_not_floors_is_refused_with_what_to_run(tmp_path, text):
    path = tmp_path / "floors.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit, match=r"not a `benchmarks/floors.py --json` file .*python benchmarks/floors.py"):
        vs_trl.load_floors(str(path), "smollm2", "float32")


def test_load_floors_takes_the_run_precision_and_refuses_other_models(tmp_path):
    floors = vs_trl.load_floors(str(_floors_file(tmp_path)), "smollm2", "bf16")
    assert (floors["gemm_gflops"], floors["bytes_per_weight"]) == (6e-6, 2)
    assert floors["head_weights"] == 49152 * 576  # SmolLM2-135M's vocabulary x hidden size
    with pytest.raises(SystemExit, match="apply to --model smollm2"):
        vs_trl.load_floors(str(_floors_file(tmp_path)), "tiny", "float32")
    with pytest.raises(SystemExit, match="floors are for 'other'"):
        vs_trl.load_floors(str(_floors_file(tmp_path, model="other")), "smollm2", "float32")


def test_report_holds_each_framework_against_its_floor(capsys):
    args = {"model": "smollm2", "G": 8, "prompts": 1, "completion": 16, "beta": 0.0, "natural_stops": True,
            "warmup": 0, "bf16": False}

    def run(step_time: float, max_length: int) -> dict:
        return {"peak_rss_kib": 1024, "steps": [{"step_time": step_time, "generate_time": 1.0, "tokens_per_second": 1.0,
                                                 "mean_length": 5.0, "max_length": max_length, "zero_spread": 1.0}]}

    # silent steps: floors of 20 s (10 positions) and 40 s (20 positions); a step 0.25x TRL's: 0.25 x 80 / 40
    floors = {k: v for k, v in FLOORS.items() if k != "head_weights"}  # the first results with floors lack it
    vs_trl.report({"args": args, "versions": {}, "load_before": "", "floors": floors, "prompt_tokens_min": 7,
                   "runs": {"grpokit": [run(30.0, 10)], "trl": [run(80.0, 20)]}})
    out = capsys.readouterr().out
    assert "grpokit step floor, s: 20.00 (20.00-20.00); step / its floor: 1.50" in out
    assert "trl step floor, s: 40.00 (40.00-40.00); step / its floor: 2.00" in out
    assert "a step 0.25x TRL's, on TRL's completions, is 0.50 (0.50-0.50) x their floor" in out


def test_runs_import_the_grpokit_they_are_given(tmp_path):
    src = tmp_path / "export"
    (src / "grpokit").mkdir(parents=True)
    (src / "grpokit" / "__init__.py").write_text("")
    (src / "grpokit" / "__main__.py").write_text("print('the export')")
    work = tmp_path / "work"
    work.mkdir()
    assert vs_trl.grpokit_origin(sys.executable, str(src), work) == "--grpokit-src"
    assert vs_trl.grpokit_origin(sys.executable, None, work) == "the working tree"
    log = work / "run.log"  # a run itself, started as run_grpokit starts `python -m grpokit train`
    vs_trl._run_child([sys.executable, "-m", "grpokit"], vs_trl._child_env(1, str(src)), log, timeout=60)
    assert log.read_text() == "the export\n"  # not the working tree's CLI
    # from the repository root `python -m grpokit` would take the working tree's package ahead of PYTHONPATH: the
    # runs start in their own directory, and a --grpokit-src that would not load is refused before any run
    with pytest.raises(SystemExit, match="would import grpokit from .* instead"):
        vs_trl.grpokit_origin(sys.executable, str(src), ROOT)
    with pytest.raises(SystemExit, match="would import grpokit from"):
        vs_trl.grpokit_origin(sys.executable, str(tmp_path / "no-package-here"), work)
    (src / "grpokit" / "__init__.py").write_text("raise ImportError('half an export')")
    with pytest.raises(SystemExit, match=r"(?s)cannot import grpokit from --grpokit-src .*half an export"):
        vs_trl.grpokit_origin(sys.executable, str(src), work)
