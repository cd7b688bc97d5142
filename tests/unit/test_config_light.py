"""Reading and checking a config loads neither torch nor transformers (a fresh interpreter, so nothing is cached)."""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROGRAM = textwrap.dedent("""
    import sys
    from pathlib import Path

    import grpokit.config
    from grpokit.config import GRPOConfig, load_config
    from grpokit.rewards.registry import BUILTIN_REWARDS

    path = Path(sys.argv[1])
    path.write_text("max_steps: 3\\nreward_funcs: [math_accuracy, {func: length, weight: 0.5}]\\nbeta: 0.1\\n")
    cfg = load_config(path, ["learning_rate=2e-6"])
    assert cfg.max_steps == 3 and cfg.weights == [1.0, 0.5] and cfg.learning_rate == 2e-6, cfg
    assert GRPOConfig(num_generations=4).generation_batch_size == 8 and "math_accuracy" in BUILTIN_REWARDS
    heavy = sorted(name for name in ("torch", "transformers") if name in sys.modules)
    print("heavy:", heavy)
""")


def test_importing_and_loading_a_config_loads_no_torch(tmp_path):
    result = subprocess.run([sys.executable, "-c", PROGRAM, str(tmp_path / "run.yaml")], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "heavy: []", result.stdout
