"""Stage 0 of examples/pipeline: SFT targets for the reasoning-gym chain_sum train questions.

Each question ("State the final answer to the following arithmetic problem: 57 + 8 - 20 =") gets a
worked answer, one operation per line, then the result on an "Answer:" line:

    57 + 8 = 65
    65 - 20 = 45
    Answer: 45

The rows keep the dataset's chat prompt, `answer` and `metadata`, so the SFT model is trained on
exactly the prompts GRPO will show it. Every worked result is checked against the dataset's answer.

    python examples/pipeline/make_sft_data.py outputs/pipeline/sft_train.jsonl [--size 500]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from grpokit.data.loading import load_records

OPTIONS = "seed=1&max_terms=3&max_digits=2"  # the same options as examples/pipeline/grpo.yaml's dataset


def worked_answer(question: str) -> tuple[str, int]:
    """The left-to-right working of the '+'/'-' chain after the question's last ':' and its result."""
    tokens = question.rsplit(":", 1)[-1].strip().removesuffix("=").split()
    value, lines = int(tokens[0]), []
    for op, term in zip(tokens[1::2], tokens[2::2], strict=True):
        result = value + int(term) if op == "+" else value - int(term)
        lines.append(f"{value} {op} {term} = {result}")
        value = result
    return "\n".join([*lines, f"Answer: {value}"]), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--size", type=int, default=500, help="train questions (default 500, as grpo.yaml)")
    args = parser.parse_args()
    rows = []
    for record in load_records(f"reasoning_gym:chain_sum?size={args.size}&{OPTIONS}"):
        completion, value = worked_answer(record["prompt"][-1]["content"])
        if value != int(record["answer"]):
            raise SystemExit(f"worked answer {value} != dataset answer {record['answer']} for {record['prompt']}")
        rows.append({**record, "completion": completion})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows with worked answers to {args.output}")


if __name__ == "__main__":
    main()
