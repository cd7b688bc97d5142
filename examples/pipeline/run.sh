#!/usr/bin/env bash
# examples/pipeline: base model -> SFT -> learnability filter -> GRPO -> evaluation on held-out questions,
# one grpokit command per stage. Run from the repository root: bash examples/pipeline/run.sh
# Measured figures and wall times: examples/pipeline/README.md.
set -euo pipefail
out=outputs/pipeline
mkdir -p "$out"
stage() { echo "== $1"; shift; local start=$SECONDS; "$@"; echo "== wall $((SECONDS - start)) s"; }

stage "0. worked answers for SFT" python examples/pipeline/make_sft_data.py "$out/sft_train.jsonl"
stage "1. SFT warm start" grpokit sft examples/pipeline/sft.yaml --overwrite
stage "2. keep the prompts the SFT model sometimes solves" \
    grpokit filter examples/pipeline/grpo.yaml --samples 8 --output "$out/filtered.jsonl"
stage "3. GRPO from the SFT model on them" \
    grpokit train examples/pipeline/grpo.yaml --set dataset="$out/filtered.jsonl" --overwrite
stage "4a. held-out: base model vs SFT" \
    grpokit eval examples/pipeline/grpo.yaml --model smollm2-135m-instruct --compare "$out/sft/final_model" \
    --samples 4 --k 1,4 --output "$out/eval_base_vs_sft.json"
stage "4b. held-out: SFT vs SFT + GRPO" \
    grpokit eval examples/pipeline/grpo.yaml --model "$out/sft/final_model" --compare "$out/grpo/final_model" \
    --samples 4 --k 1,4 --output "$out/eval_sft_vs_grpo.json"
