"""Pre-flight (`grpokit check CONFIG`): run every reward on a few real rows before any model loads.

Each reward function is called, in its worker and under `reward_timeout` as in training, on the
first rows of the train data with synthetic completions: the reference answer and an empty
completion, both in the form training produces (message lists for conversational data, strings
otherwise), and the reference in the other form. The report gives, per function and form, the
values (None = not applicable), the call time and any failure. A failure on a form training
produces makes the check fail; one on the other form is a note. completion_ids are the UTF-8 bytes of
the text: no tokenizer is loaded.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from dataclasses import dataclass, field

from grpokit.config import GRPOConfig
from grpokit.data import loading as data_mod
from grpokit.errors import RewardError
from grpokit.rewards import RewardBatch, RewardFunction, RewardRunner, resolve_rewards
from grpokit.rewards.contract import REFERENCE_ALIASES

REFERENCE_COLUMNS = (*REFERENCE_ALIASES, "canonical_solution", "target")


@dataclass(slots=True, kw_only=True)
class PreflightReport:
    lines: list[str] = field(default_factory=list)
    problems: int = 0

    @property
    def ok(self) -> bool:
        return self.problems == 0


def _completions(rows: list[dict], conversational: bool) -> dict[str, tuple[list, bool]]:
    """Synthetic completions by form -> (completions, whether training produces that form)."""
    column = next((c for c in REFERENCE_COLUMNS if c in rows[0]), None)
    reference = [str(r[column]) for r in rows] if column else ["The answer is 42."] * len(rows)

    def shaped(texts: list[str], chat: bool) -> list:
        return [[{"role": "assistant", "content": t}] for t in texts] if chat else texts

    forms = {}
    if column is not None:
        forms[f"reference answer ({column})"] = (shaped(reference, conversational), True)
    forms["empty completion"] = (shaped([""] * len(rows), conversational), True)
    other = "plain string" if conversational else "chat message"
    forms[f"reference as a {other}"] = (shaped(reference, not conversational), False)
    return forms


def _kind(f: RewardFunction) -> str:
    src = f.source
    if inspect.isroutine(src) or isinstance(src, functools.partial):
        shape = "function"
    elif not callable(src):
        shape = "compute_reward object"
    else:
        shape = f"{type(src).__name__} instance"
    flags = [s for s, on in (("per-sample", f.per_sample), ("async", f.is_async), ("cached", f.expensive)) if on]
    where = "killable worker" if f.isolation == "process" else "in-process"
    return ", ".join([shape, *flags, where])


def _values(values: list[float]) -> str:
    return "[" + ", ".join("None" if math.isnan(v) else f"{v:.4g}" for v in values) + "]"


def preflight(cfg: GRPOConfig, rows: int = 3) -> PreflightReport:
    report = PreflightReport()
    records = data_mod.dataset_records(cfg, "train")[:rows]
    funcs = resolve_rewards(cfg.reward_funcs)
    conversational = isinstance(records[0]["prompt"], list)
    report.lines.append(f"pre-flight: {len(funcs)} reward function(s) on {len(records)} row(s) of {cfg.dataset} "
                        f"(columns: {', '.join(records[0])}; {'chat' if conversational else 'plain'} prompts), "
                        f"reward_timeout {cfg.reward_timeout}s")
    forms = _completions(records, conversational)
    columns = {k: [r[k] for r in records] for k in records[0]}
    for f in funcs:
        report.lines.append(f"reward '{f.name}' ({_kind(f)})")
        try:
            f.check_columns(records[0].keys())
        except RewardError as exc:
            report.lines.append(f"  FAIL {exc}")
            report.problems += 1
            continue
        with RewardRunner([f], timeout=cfg.reward_timeout, error_rate_limit=1.0) as runner:
            for form, (completions, used) in forms.items():
                batch = RewardBatch(prompts=columns["prompt"], completions=completions,
                                    completion_ids=[list(_text(c).encode()) for c in completions], columns=columns,
                                    context={"max_completion_length": cfg.max_completion_length, "step": 0,
                                             "trainer_state": {"global_step": 0, "max_steps": cfg.max_steps}})
                started = time.monotonic()
                try:
                    values = runner.score(batch)[:, 0].tolist()
                except RewardError as exc:
                    _problem(report, used, form, str(exc))
                    continue
                elapsed = time.monotonic() - started
                failures = runner.last_failures
                line = f"  {form:<40} {_values(values):<28} {elapsed:6.2f}s"
                if failures:
                    _problem(report, used, form, f"{len(failures)} of {len(values)} failed: {failures[0]}")
                else:
                    report.lines.append(line + ("" if used else "  (not a form this data produces)"))
    report.lines.append("pre-flight: OK, every reward ran on every form this data produces" if report.ok else
                        f"pre-flight: FAILED, {report.problems} problem(s) above")
    return report


def _text(completion) -> str:
    return completion if isinstance(completion, str) else str(completion[-1]["content"])


def _problem(report: PreflightReport, used: bool, form: str, detail: str) -> None:
    if used:
        report.problems += 1
        report.lines.append(f"  FAIL {form}: {detail}")
    else:
        report.lines.append(f"  note {form}: {detail} (this data does not produce that form)")
