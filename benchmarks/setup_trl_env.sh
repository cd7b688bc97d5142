#!/usr/bin/env bash
# Builds the separate environment that benchmarks/vs_trl.py runs TRL in. TRL is not a grpokit
# dependency, so it lives in its own venv, outside the repository.
#
# Usage: bash benchmarks/setup_trl_env.sh [VENV_DIR]   (default .venv-trl)
# Then:  python benchmarks/vs_trl.py --trl-python VENV_DIR/bin/python ...
set -euo pipefail

venv="${1:-.venv-trl}"
here="$(cd "$(dirname "$0")" && pwd)"

python3 -m venv "$venv"
"$venv/bin/pip" install --upgrade pip
# torch first, pinned to grpokit's version, so TRL's resolver does not pull another build.
"$venv/bin/pip" install "torch==2.13.0"
"$venv/bin/pip" install -r "$here/vs_trl_requirements.txt"
"$venv/bin/python" -c "import torch, transformers, trl, datasets, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__, 'accelerate', accelerate.__version__)"
