"""Built-in verifiable tasks, generated in code so they need no download.

`arithmetic`: sums and differences of a few small integers ("What is 7 + 23 - 5?"), in the
spirit of reasoning-gym's chain_sum. Questions are drawn from one seeded stream and split into
disjoint train, held-out and validation sets (no question text appears in two), so the held-out
accuracy measures generalisation, not memorisation, and a best model chosen on the validation split
is not chosen on the questions its accuracy is reported on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SYSTEM_PROMPT = ("You are a careful calculator. Work out the result, then finish with a line of the form "
                 "'Answer: <number>'.")


@dataclass(slots=True, kw_only=True)
class ArithmeticSpec:
    min_terms: int = 2
    max_terms: int = 3
    min_digits: int = 1
    max_digits: int = 2
    seed: int = 1234
    eval_size: int = 200


def _question(rng: random.Random, spec: ArithmeticSpec) -> tuple[str, int]:
    n_terms = rng.randint(spec.min_terms, spec.max_terms)
    terms = [rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)
             for d in (rng.randint(spec.min_digits, spec.max_digits) for _ in range(n_terms))]
    ops = [rng.choice("+-") for _ in range(n_terms - 1)]
    expr = str(terms[0]) + "".join(f" {op} {t}" for op, t in zip(ops, terms[1:], strict=True))
    value = terms[0] + sum(t if op == "+" else -t for op, t in zip(ops, terms[1:], strict=True))
    return f"What is {expr}?", value


def arithmetic_splits(size: int, spec: ArithmeticSpec | None = None, validation: int | None = None
                      ) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, held_out, validation) lists of {"prompt": [...messages], "answer": "N"} records: the stream's first
    `eval_size` distinct questions are held out, the next `size` train, the next `validation` (default
    `eval_size`; 0 draws none) the validation split, for choosing a run's best model on other questions than those
    its accuracy is reported on. The held-out set depends only on `spec` (not on `size`), so it is the same in every
    run; drawing a validation split changes neither train nor held-out."""
    spec = spec or ArithmeticSpec()
    validation = spec.eval_size if validation is None else validation
    rng = random.Random(spec.seed)
    seen: set[str] = set()
    held_out: list[dict] = []
    train: list[dict] = []
    valid: list[dict] = []
    attempts, wanted = 0, spec.eval_size + size + validation
    while len(held_out) + len(train) + len(valid) < wanted:
        attempts += 1
        if attempts > 100 * wanted + 1000:
            raise ValueError(f"arithmetic task: cannot draw {size} + {spec.eval_size} + {validation} distinct "
                             f"questions with {spec}; widen the digit or term range")
        text, value = _question(rng, spec)
        if text in seen:
            continue
        seen.add(text)
        record = {"prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}],
                  "answer": str(value)}
        (held_out if len(held_out) < spec.eval_size else train if len(train) < size else valid).append(record)
    return train, held_out, valid
