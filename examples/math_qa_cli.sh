#!/usr/bin/env sh
# Mirrors reference workflow 003 (the math-QA trainer's command line: `--config PRESET` plus options); run from the repo root.
# Each option sets one config key (see `grpokit train --help`); extra arguments (e.g. --dry-run, --set ...) pass through.
exec grpokit train --config fast_test \
    --train-data examples/data/math_tiny.jsonl \
    --val-data examples/data/math_tiny_val.jsonl \
    --reward-model heuristic \
    --num-samples 2 --batch-size 2 --kl-coef 0.1 --lr 5e-6 --epochs 1 --max-length 32 \
    --no-4bit --no-lora \
    --output-dir outputs/math_qa_cli "$@"
