"""Pre-flight: what is checked before any model loads.

`early_checks` is the one set of checks every run makes first, so that a bad setting fails in seconds:
`grpokit train` (the trainer runs them before its model load), `grpokit train --dry-run` (they are all it
runs) and `grpokit check` (before its rewards run). They load the train and held-out records and resolve
the reward functions, and check 4-bit loading on this machine, each reward's arguments against the
columns, `metric_for_best_model` against this run's eval metrics, the `report_to` trackers' packages,
and vLLM with several processes.

`preflight` (`grpokit check CONFIG`) then runs every reward on a few real rows (`probe_rewards`; `grpokit train
--dry-run` runs it too, on the forms training produces, so a reward that cannot be called fails before a model
loads). Each reward function is
called, in its worker and under `reward_timeout` as in training, on the first rows of the train data
with synthetic completions: the reference answer and an empty completion, both in the form training
produces (message lists for conversational data, strings otherwise), and the reference in the other
form. The report gives, per function and form, the values (None = not applicable), the call time and
any failure. A failure on a form training produces makes the check fail; one on the other form is a
note. completion_ids are the UTF-8 bytes of the text: no tokenizer is loaded.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import time
from dataclasses import dataclass, field

from grpokit.config import GRPOConfig
from grpokit.data import loading as data_mod
from grpokit.errors import ConfigError, RewardError
from grpokit.evaluation.evaluate import check_best_metric
from grpokit.models.loading import check_model_name, check_quantization, local_tokenizer
from grpokit.observe.metrics import check_sinks
from grpokit.rewards import RewardBatch, RewardFunction, RewardRunner, resolve_rewards
from grpokit.rewards.contract import REFERENCE_ALIASES
from grpokit.runtime.distributed import world_size

log = logging.getLogger(__name__)

REFERENCE_COLUMNS = (*REFERENCE_ALIASES, "canonical_solution", "target")


@dataclass(slots=True, kw_only=True)
class RunInputs:
    """What the early checks loaded and settled."""

    cfg: GRPOConfig  # num_train_epochs turned into max_steps, now that the data size is known
    reward_funcs: list[RewardFunction]
    train_records: list[dict]
    eval_records: list[dict]  # without the train prompts, cut to eval_limit; [] without held-out data
    validation_records: list[dict]  # without the train and held-out prompts, cut to eval_limit; [] without


def early_checks(cfg: GRPOConfig, *, train_records: list[dict] | None = None, eval_records: list[dict] | None = None,
                 reward_funcs: list | None = None, check_columns: bool = True, settle_cuda: bool = True,
                 check_model: bool = True, tokenizer=None, check_prompts: bool = True) -> RunInputs:
    """Load what a run needs before its model and check every setting that can be checked without it.

    The Python API hands in records and reward callables already made; else the config names them.
    `check_columns` False leaves each reward's arguments against the columns to the caller (`preflight` reports
    every reward's instead of stopping at the first). `settle_cuda` False leaves `bf16: auto` on a CUDA GPU for the
    trainer to settle once its reward workers have forked (`GRPOConfig.settle_auto`). `check_model` False leaves a
    local model directory that does not exist to the caller (`preflight` reports it with the rewards).
    `tokenizer`: the run's (else the model's, where it is on this machine: `local_tokenizer`), passed to a dataset
    `transform` and, with `check_prompts`, used to tokenise every prompt as the run will: chat prompts without a chat
    template, and data whose every prompt is over max_prompt_length, fail now rather than after the model loads."""
    cfg.settle_auto(cuda=settle_cuda)  # bf16: auto -> true or false on this machine, before anything reads it
    check_quantization(cfg)  # load_in_4bit without a CUDA GPU or bitsandbytes: fail before data and model
    funcs = resolve_rewards(reward_funcs or cfg.reward_funcs)
    if tokenizer is None and isinstance(cfg.model, str):
        tokenizer = local_tokenizer(cfg.model)
        if tokenizer is None and cfg.transform is not None:
            log.warning("transform %s is called with tokenizer=None here: the tokenizer of '%s' is not on this "
                        "machine yet (a hub model not downloaded, or the embedded model not built); the run loads "
                        "it first and passes it", cfg.transform, cfg.model)
    train = (train_records if train_records is not None
             else data_mod.dataset_records(cfg, "train", tokenizer=tokenizer))
    held = eval_records if eval_records is not None else data_mod.dataset_records(cfg, "eval", tokenizer=tokenizer)
    held = data_mod.without_train_prompts(held, train, cfg.eval_dataset or "eval_dataset") if held else []
    if held and cfg.eval_limit:
        held = held[:cfg.eval_limit]
    validation = data_mod.dataset_records(cfg, "validation", tokenizer=tokenizer) or []
    if validation:  # choosing a model on prompts it trained on, or on those it is reported on, would flatter it
        validation = data_mod.without_train_prompts(validation, train + held, cfg.validation_dataset,
                                                    "validation_dataset", "training or held-out")
        validation = validation[:cfg.eval_limit] if cfg.eval_limit else validation
    if cfg.num_train_epochs is not None:  # epochs -> steps, now that the data size is known (config/schema.py)
        steps = cfg.steps_for_epochs(len(train))
        log.info("%g epoch(s) over %d prompts = %d optimizer steps", cfg.num_train_epochs, len(train), steps)
        cfg = cfg.model_copy(update={"max_steps": steps, "num_train_epochs": None})
    if check_prompts and tokenizer is not None:  # chat prompts without a chat template, every prompt too long
        for records, spec in ((train, cfg.dataset), (held, cfg.eval_dataset), (validation, cfg.validation_dataset)):
            if records:
                data_mod.tokenise_prompts(records, tokenizer, cfg.max_prompt_length, spec, log_drops=False)
    if check_columns:  # a reward argument that matches no column fails now, not at step 1
        for f in funcs:
            f.check_columns(train[0].keys())
    check_best_metric(cfg, [f.name for f in funcs], bool(held), bool(validation))
    check_sinks(cfg.report_to)  # a tracker asked for but not installed fails now, not after the model loads
    if cfg.use_vllm and world_size() > 1:
        raise ConfigError(f"use_vllm with {world_size()} processes is not supported yet: each process generates "
                          "with the in-process sampler; drop use_vllm, or run one process with vLLM")
    if check_model and isinstance(cfg.model, str):  # a local model directory that is not there fails now
        check_model_name(cfg.model)
    if cfg.use_vllm:  # in server mode, a server that does not answer, or serves another model, fails now
        from grpokit.rollout.vllm_engine import check_server

        check_server(cfg)
    return RunInputs(cfg=cfg, reward_funcs=funcs, train_records=train, eval_records=held,
                     validation_records=validation)


@dataclass(slots=True, kw_only=True)
class PreflightReport:
    lines: list[str] = field(default_factory=list)
    problems: int = 0
    uncallable: list[str] = field(default_factory=list)  # rewards that failed on every form training produces

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
    """The early checks (their errors are raised), then every reward on the first `rows` train rows; a local model
    directory that does not exist is one more problem of the report."""
    report = probe_rewards(early_checks(cfg, check_columns=False, check_model=False), rows)
    try:
        check_model_name(cfg.model)
    except ConfigError as exc:
        report.problems += 1
        report.lines.insert(-1, f"FAIL {exc}")
        report.lines[-1] = f"pre-flight: FAILED, {report.problems} problem(s) above"
    return report


def probe_rewards(inputs: RunInputs, rows: int = 3, *, other_forms: bool = True) -> PreflightReport:
    """Every reward of `inputs` on its first `rows` train rows with the synthetic completions (module docstring);
    `other_forms` False tries only the forms training produces (`grpokit train --dry-run`)."""
    report = PreflightReport()
    cfg = inputs.cfg
    records, funcs = inputs.train_records[:rows], inputs.reward_funcs
    conversational = isinstance(records[0]["prompt"], list)
    report.lines.append(f"pre-flight: {len(funcs)} reward function(s) on {len(records)} row(s) of {cfg.dataset} "
                        f"(columns: {', '.join(records[0])}; {'chat' if conversational else 'plain'} prompts), "
                        f"reward_timeout {cfg.reward_timeout}s")
    forms = {form: value for form, value in _completions(records, conversational).items() if other_forms or value[1]}
    columns = {k: [r[k] for r in records] for k in records[0]}
    for f in funcs:
        report.lines.append(f"reward '{f.name}' ({_kind(f)})")
        try:
            f.check_columns(records[0].keys())
        except RewardError as exc:
            report.lines.append(f"  FAIL {exc}")
            report.problems += 1
            report.uncallable.append(f.name)
            continue
        problems = report.problems
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
        if report.problems - problems == sum(used for _, used in forms.values()):
            report.uncallable.append(f.name)
    report.lines.append("pre-flight: OK, every reward ran on every form this data produces" if report.ok else
                        f"pre-flight: FAILED, {report.problems} problem(s) above")
    return report


def _text(completion) -> str:
    return completion if isinstance(completion, str) else str(completion[-1]["content"])


CALL_FIX = ("rewards are called with keyword arguments bound by parameter name: TRL's (prompts, completions, "
            "**kwargs) with each dataset column by its name, a per-sample f(completion, <column>) one row at a time, "
            "or a class's compute_reward(self, prompts, completions, **kwargs); README, 'Reward functions'")


CHAT_FIX = ("chat prompts give completions (and prompts) as message lists, [{'role': 'assistant', 'content': ...}], "
            "as TRL does; annotate the parameter for texts (`completions: List[str]`, a per-sample `completion: str`) "
            "to get strings, or read each one's [-1]['content']")


def _problem(report: PreflightReport, used: bool, form: str, detail: str) -> None:
    if used:
        report.problems += 1
        fix = f"\n       fix: {CALL_FIX}" if "TypeError" in detail and "argument" in detail else ""
        if "'list' object has no attribute" in detail:
            fix = f"\n       fix: {CHAT_FIX}"
        report.lines.append(f"  FAIL {form}: {detail}{fix}")
    else:
        report.lines.append(f"  note {form}: {detail} (this data does not produce that form)")
