"""`grpokit sft`: supervised fine-tuning, the warm start before GRPO.

Each row becomes a prompt and the tokens trained on. A prompt is rendered exactly as GRPO renders
it (`data.tokenise_prompts`: the chat template with the generation prompt for conversational
prompts), and the target follows it as GRPO's completion would: the answer's tokens and EOS. The
target is the column `sft_target_column`, else 'completion', 'solution' or 'answer' (in that order: gsm8k's worked
`solution` before its bare final `answer`; the run summary names the column); a target that
is a list of chat messages (TRL's conversational prompt-completion rows) extends the prompt's
conversation. Rows with a 'messages' conversation (or whose only chat column is 'messages') train
on every assistant turn: each turn's tokens up to and including EOS, located by rendering the
conversation up to that turn on its own. Loss is on those tokens only (labels -100 elsewhere).

The loss is the mean negative log-likelihood over the labelled tokens of one optimizer step (all its
accumulation micro-batches: one global normaliser, as in the GRPO loss), computed with the log-probs
GRPO scores (`logprobs.completion_logps`, temperature 1). LoRA runs are merged into the base model
before saving, so `final_model/` is a plain model directory for `model:` / `--sft-model`.

Departures from the GRPO run's settings, applied only where the config leaves the key unset (each is
logged): `learning_rate` 2e-5 (2e-4 with LoRA) instead of GRPO's 1e-6; one epoch over the data instead
of `max_steps: 100`; `output_dir` 'outputs/sft'. Rows whose prompt is longer than `max_prompt_length`
or whose target (with EOS) is longer than `max_completion_length` tokens are dropped and counted.
Checkpoints as GRPO's (checkpoint.py): OUTPUT_DIR/checkpoint-N every `save_steps` and on SIGINT / SIGTERM (after
the step in progress), with the weights or adapter, optimizer, scheduler, every RNG and the data order; `grpokit
sft CONFIG --resume [PATH]` goes on from one, and N steps, resume, N more equal 2N steps.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grpokit.algo.batches import pack
from grpokit.config import GRPOConfig
from grpokit.data import loading as data
from grpokit.errors import ConfigError, DataError, TrainingError
from grpokit.models.loading import (
    load_policy,
    load_tokenizer,
    optimizer_and_schedule,
    prepare_policy,
    resolve_model_path,
    transform_tokenizer,
)
from grpokit.models.logprobs import completion_logps
from grpokit.observe.metrics import check_sinks
from grpokit.observe.runlog import precision
from grpokit.runtime import allocator, run_device
from grpokit.runtime.distributed import rank
from grpokit.train import checkpoint
from grpokit.train.harness import RunHarness, claim_output_dir, resume_checkpoint

log = logging.getLogger(__name__)

TARGET_FALLBACKS = ("completion", "solution", "answer")  # a worked solution before a bare final answer
IGNORE_INDEX = -100  # the label of a token the loss leaves out (transformers' convention)
SFT_LEARNING_RATE = 2e-5
SFT_LORA_LEARNING_RATE = 2e-4
SFT_OUTPUT_DIR = "outputs/sft"


@dataclass(slots=True, kw_only=True)
class SFTExample:
    prompt_ids: list[int]  # the prompt as GRPO renders and tokenises it
    completion_ids: list[int]  # what follows: the target + EOS, or the rest of a conversation
    loss_mask: list[int]  # [len(completion_ids)]: 1 on the tokens trained on (answer, assistant turns)


@dataclass(slots=True, kw_only=True)
class SFTBatch:
    input_ids: torch.Tensor  # [B, P + T]: prompts left-padded, completions right-padded (batches.pack)
    attention_mask: torch.Tensor  # [B, P + T]
    labels: torch.Tensor  # [B, P + T]: the token where it is trained on, IGNORE_INDEX on prompt, padding, other turns
    completion_length: int  # T


@dataclass(slots=True, kw_only=True)
class SFTResult:
    output_dir: Path
    model_dir: Path
    steps: int
    examples: int
    dropped: int
    first_loss: float
    last_loss: float


def sft_defaults(cfg: GRPOConfig) -> GRPOConfig:
    """`cfg` with SFT's own defaults for the keys the user left unset (GRPO's are wrong for SFT), each logged."""
    update: dict[str, Any] = {}
    if "learning_rate" not in cfg.model_fields_set:
        update["learning_rate"] = SFT_LORA_LEARNING_RATE if cfg.use_peft else SFT_LEARNING_RATE
        log.info("learning_rate not set: SFT uses %g (%s; GRPO's default %g is too small for SFT)",
                 update["learning_rate"], "LoRA" if cfg.use_peft else "full fine-tuning", cfg.learning_rate)
    if not {"max_steps", "num_train_epochs"} & cfg.model_fields_set:
        update["num_train_epochs"] = 1.0
        log.info("neither max_steps nor num_train_epochs set: SFT runs one epoch over the data")
    if "output_dir" not in cfg.model_fields_set:
        update["output_dir"] = SFT_OUTPUT_DIR
    return cfg.model_copy(update=update)


def load_sft_records(cfg: GRPOConfig) -> list[dict[str, Any]]:
    """The train records, checked to have a target; a dataset whose only chat column is 'messages' loads too."""
    records = data.dataset_records(cfg, "train", prompt_fallbacks=(*data.PROMPT_FALLBACKS, "messages"),
                                   tokenizer=transform_tokenizer(cfg))
    sft_source(records, cfg)
    return records


def sft_source(records: list[dict[str, Any]], cfg: GRPOConfig) -> tuple[str, str]:
    """Where each row's trained tokens come from: ('target', column) or ('conversation', column)."""
    columns = list(records[0])
    where = f"dataset '{cfg.dataset}'"
    if cfg.sft_target_column is not None:
        if cfg.sft_target_column not in columns:
            raise DataError(f"{where} has no column sft_target_column = '{cfg.sft_target_column}'; its columns are "
                            f"{columns}. Set sft_target_column to the column holding each prompt's answer.")
        return "target", cfg.sft_target_column
    if "messages" in columns:
        return "conversation", "messages"
    if all(isinstance(r["prompt"], list) and r["prompt"][-1]["role"] == "assistant" for r in records):
        return "conversation", "prompt"  # no GRPO prompt ends with a reply: a conversation ('messages' taken as prompt)
    column = next((c for c in TARGET_FALLBACKS if c in columns), None)
    if column is not None:
        return "target", column
    raise DataError(f"{where} has no target for SFT: no column {', '.join(map(repr, TARGET_FALLBACKS))} and no "
                    f"'messages' conversation; its columns are {columns}. Set sft_target_column to the column "
                    "holding each prompt's answer (or rename one with column_mapping).")


def build_examples(records: list[dict[str, Any]], tokenizer, cfg: GRPOConfig) -> tuple[list[SFTExample], int]:
    """Tokenised examples of `records` and how many rows were dropped for the length limits."""
    kind, column = sft_source(records, cfg)
    spec = cfg.dataset
    for i, record in enumerate(records):
        if record[column] is None or record[column] == "" or record[column] == []:
            raise DataError(f"dataset '{spec}', row {i}: column '{column}' is empty; SFT needs a target in every row")
    if kind == "target" and not isinstance(records[0][column], list):
        prompts = data.tokenise_prompts(records, tokenizer, cfg.max_prompt_length, spec)
        examples = []
        for record, prompt_ids in zip(prompts.records, prompts.prompt_ids, strict=True):
            target = tokenizer(str(record[column]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            examples.append(SFTExample(prompt_ids=prompt_ids, completion_ids=target, loss_mask=[1] * len(target)))
        dropped = prompts.dropped
    else:
        if not tokenizer.chat_template:
            raise DataError(f"dataset '{spec}' has chat conversations but the tokenizer has no chat template; "
                            "use a model whose tokenizer defines one")
        examples = [conversation_example(_conversation(record, kind, column, cfg, f"dataset '{spec}', row {i}"),
                                         tokenizer, f"dataset '{spec}', row {i}") for i, record in enumerate(records)]
        limit = cfg.max_prompt_length
        kept = [e for e in examples if limit is None or len(e.prompt_ids) <= limit]
        if len(kept) < len(examples):
            log.warning("dataset '%s': dropped %d of %d rows whose prompt (before the first assistant turn) is longer "
                        "than max_prompt_length=%s tokens", spec, len(examples) - len(kept), len(examples), limit)
        dropped, examples = len(examples) - len(kept), kept
    kept = [e for e in examples if len(e.completion_ids) <= cfg.max_completion_length]
    if len(kept) < len(examples):
        log.warning("dataset '%s': dropped %d of %d rows whose target (with EOS; for conversations, from the first "
                    "assistant turn on) is longer than max_completion_length=%d tokens", spec,
                    len(examples) - len(kept), len(examples), cfg.max_completion_length)
    if not kept:
        raise DataError(f"dataset '{spec}': every row is over the length limits (max_prompt_length="
                        f"{cfg.max_prompt_length}, max_completion_length={cfg.max_completion_length}); raise them")
    return kept, dropped + len(examples) - len(kept)


def _conversation(record: dict[str, Any], kind: str, column: str, cfg: GRPOConfig, where: str) -> list[dict]:
    """The chat messages of one row, a system prompt added as `normalise_records` adds it to prompts."""
    if kind == "target":  # a prompt followed by a message-list completion
        if not isinstance(record["prompt"], list):
            raise DataError(f"{where}: column '{column}' holds chat messages but the prompt is a plain string; "
                            "give both as messages or both as text")
        return [*record["prompt"], *record[column]]
    messages = record[column]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise DataError(f"{where}, column '{column}': expected a list of {{role, content}} messages")
    if column != "prompt" and cfg.system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
    return messages


def conversation_example(messages: list[dict], tokenizer, where: str) -> SFTExample:
    """A conversation trained on its assistant turns. Turn i's tokens are those between the conversation up
    to i rendered with the generation prompt (the prompt GRPO would give) and the conversation through i,
    cut after EOS (what the template adds after the end-of-turn token is never generated)."""
    def ids(msgs: list[dict], generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=generation_prompt, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    full = ids(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise DataError(f"{where}: the conversation starts with an assistant message; it needs a user "
                            "(or system) message before the first assistant reply")
        before, through = ids(messages[:i], True), ids(messages[:i + 1], False)
        if full[:len(before)] != before or full[:len(through)] != through:
            raise DataError(f"{where}: the chat template renders the conversation up to message {i} differently "
                            "alone than inside the whole conversation, so its assistant tokens cannot be located; "
                            "split the conversation into prompt/completion rows")
        start, end = len(before), len(through)
        if tokenizer.eos_token_id in full[start:end]:
            end = start + full[start:end].index(tokenizer.eos_token_id) + 1
        spans.append((start, end))
    if not spans:
        raise DataError(f"{where}: the conversation has no assistant message to train on")
    first, last = spans[0][0], spans[-1][1]
    loss_mask = [0] * (last - first)
    for start, end in spans:
        loss_mask[start - first:end - first] = [1] * (end - start)
    return SFTExample(prompt_ids=full[:first], completion_ids=full[first:last], loss_mask=loss_mask)


def collate(examples: list[SFTExample], pad_id: int, device: torch.device | str = "cpu") -> SFTBatch:
    """Pack examples as GRPO packs prompt + completion (left-padded prompts), with labels."""
    input_ids, attention_mask, completion_mask = pack([e.prompt_ids for e in examples],
                                                      [e.completion_ids for e in examples], pad_id, device)
    width = completion_mask.shape[1]
    loss_mask = torch.zeros_like(completion_mask, dtype=torch.bool)  # [B, T]
    for i, example in enumerate(examples):
        loss_mask[i, :len(example.loss_mask)] = torch.tensor(example.loss_mask, dtype=torch.bool)
    labels = torch.full_like(input_ids, IGNORE_INDEX)  # [B, P + T]
    labels[:, -width:] = torch.where(loss_mask, input_ids[:, -width:], IGNORE_INDEX)
    return SFTBatch(input_ids=input_ids, attention_mask=attention_mask, labels=labels, completion_length=width)


def answer_nll(model, batch: SFTBatch, chunk_size: int, share_prompts: bool) -> torch.Tensor:
    """Summed negative log-likelihood of the labelled tokens, from the log-probs GRPO computes (temperature 1)."""
    width = batch.completion_length
    logps, _ = completion_logps(model, batch.input_ids, batch.attention_mask, width, 1.0, chunk_size,
                                share_prompts)  # [B, T]
    trained = batch.labels[:, -width:] != IGNORE_INDEX  # [B, T]
    return -torch.where(trained, logps, torch.zeros_like(logps)).sum()


def run_sft(cfg: GRPOConfig, config_name: str = "CONFIG", resume: str | bool | None = None,
            force: bool = False, overwrite: bool = False) -> SFTResult:
    """Fine-tune `cfg.model` on `cfg.dataset`'s targets; save OUTPUT_DIR/final_model, metrics.jsonl, config.yaml.

    `resume`: go on from the newest checkpoint-N in output_dir (True) or from a checkpoint's path; `force` skips the
    check that the settings which change the results are the checkpoint's; `overwrite` moves a run already in
    output_dir aside (without it such a run stops this one, harness.claim_output_dir)."""
    cfg.settle_auto()  # bf16: auto -> true or false on this machine
    if cfg.load_in_4bit:  # final_model is LoRA merged into the loaded base: a 4-bit base would save rounded weights
        raise ConfigError("load_in_4bit: `grpokit sft` does not train on 4-bit weights: it saves final_model as the "
                          "LoRA adapter merged into the base it trained on, and a 4-bit base would make that a "
                          "rounded, quantised model. Run SFT without it (--set load_in_4bit=false; LoRA on bf16 "
                          "weights: use_peft: true, torch_dtype: bfloat16), then GRPO with load_in_4bit from its "
                          "final_model")
    separate_output = "output_dir" in cfg.model_fields_set  # then GRPO with the same config would write here too
    cfg = sft_defaults(cfg)
    harness = RunHarness(cfg, command="sft", config_name=config_name)
    claim_output_dir(Path(cfg.output_dir), resume=resume, overwrite=overwrite, command="sft", config_name=config_name,
                     main=rank() == 0)  # an earlier run there is never overwritten
    resumed_from = resume_checkpoint(cfg, resume, kind="sft")  # before anything loads
    device = torch.device(run_device(cfg.device))
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    # data errors come before the (slow) model load
    records = load_sft_records(cfg)
    check_sinks(cfg.report_to)
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path)
    examples, dropped = build_examples(records, tokenizer, cfg)
    rows_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    if cfg.num_train_epochs is not None:
        steps = max(1, math.ceil(cfg.num_train_epochs * math.ceil(len(examples) / rows_per_step)))
        log.info("%g epoch(s) over %d examples = %d optimizer steps", cfg.num_train_epochs, len(examples), steps)
        cfg = cfg.model_copy(update={"max_steps": steps, "num_train_epochs": None})

    trainable = prepare_policy(load_policy(model_path, getattr(torch, cfg.torch_dtype)), cfg, device)
    policy, onednn = trainable.module, trainable.onednn_linear
    optimizer, scheduler = optimizer_and_schedule(policy, cfg)

    out = Path(cfg.output_dir)
    order_rng = random.Random(cfg.seed)
    run = _SFTState()
    if resumed_from is not None:
        run = _restore(cfg, resumed_from, force, policy, optimizer, scheduler, order_rng)
    kind, column = sft_source(records, cfg)
    trains_on = f"column '{column}'" if kind == "target" else f"the assistant turns of column '{column}'"
    summary = [f"SFT of {cfg.model} on {len(examples)} examples ({dropped} dropped) from {cfg.dataset}, trained on "
               f"{trains_on}: "
               f"{cfg.max_steps} steps of {rows_per_step} rows, lr {cfg.learning_rate:g}, "
               f"{'LoRA' if cfg.use_peft else 'all weights'}{' (float32 linear layers on oneDNN)' if onednn else ''}",
               *([precision(cfg)] if precision(cfg) else []),  # the bf16 choice on a line of its own
               *([allocator.describe()] if device.type == "cpu" else []),
               *([f"resumed from {resumed_from}: step {run.step} of {cfg.max_steps}"] if resumed_from else [])]

    def save_checkpoint() -> Path:
        state = {"kind": "sft", "global_step": run.step, "order": run.order, "losses": run.losses,
                 "num_tokens": run.seen_tokens, "consecutive_skips": run.skips, "train_seconds": run.seconds,
                 "trackers": run.trackers}
        return checkpoint.save(out, run.step, policy=policy, tokenizer=tokenizer, optimizer=optimizer,
                               scheduler=scheduler, state=state, rng=checkpoint.rng_state(order_rng), pending=None,
                               config_yaml=cfg.to_yaml(), keep=cfg.save_total_limit)

    def step() -> int:
        run.step += 1
        _sft_step(run, cfg, examples, order_rng, policy, optimizer, scheduler, tokenizer, device, metrics_log,
                  rows_per_step)
        return run.step

    with harness.open(resume_step=run.step if resumed_from else None, summary=summary,
                      trackers=run.trackers) as metrics_log:
        run.trackers = metrics_log.tracker_ids()
        harness.run(step=step, position=lambda: run.step, save=save_checkpoint, spent=lambda: run.seconds)
        model_dir = out / "final_model"
        (policy.merge_and_unload() if cfg.use_peft else policy).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        log.info("train loss %.4f at the first step -> %.4f at the last", run.losses[0], run.losses[-1])
        log.info("saved %s (%s)", model_dir, "LoRA merged into the base weights" if cfg.use_peft else "all weights")
        log.info("continue with GRPO: grpokit train %s --preset from_sft --sft-model %s%s", config_name, model_dir,
                 f" --output-dir {out}-grpo" if separate_output else "")
    return SFTResult(output_dir=out, model_dir=model_dir, steps=run.step, examples=len(examples), dropped=dropped,
                     first_loss=run.losses[0], last_loss=run.losses[-1])


@dataclass(slots=True, kw_only=True)
class _SFTState:
    """What an SFT run carries from step to step, and what its checkpoints keep."""

    step: int = 0
    order: list[int] = field(default_factory=list)  # the current epoch's shuffled example indices not yet used
    losses: list[float] = field(default_factory=list)
    seen_tokens: int = 0
    skips: int = 0  # optimizer steps skipped in a row (non-finite loss or gradient norm)
    seconds: float = 0.0  # time spent in optimizer steps (max_train_seconds' budget)
    trackers: dict[str, str] = field(default_factory=dict)  # report_to trackers' run ids: a resume continues them


def _restore(cfg: GRPOConfig, path: Path, force: bool, policy, optimizer, scheduler, order_rng) -> _SFTState:
    """Put a freshly built SFT run back into the state checkpoint `path` was written in."""
    saved = checkpoint.load(path)
    if not force:
        checkpoint.check_config(saved.config, cfg.model_dump(mode="json"), path)
    checkpoint.load_weights(policy, path, cfg.use_peft)
    optimizer.load_state_dict(saved.optimizer)
    scheduler.load_state_dict(saved.scheduler)
    checkpoint.set_rng_state(saved.rng, order_rng)
    state = saved.state
    return _SFTState(step=state["global_step"], order=state["order"], losses=state["losses"],
                     seen_tokens=state["num_tokens"], skips=state["consecutive_skips"],
                     seconds=state.get("train_seconds", 0.0), trackers=dict(state.get("trackers") or {}))


def _sft_step(run: _SFTState, cfg: GRPOConfig, examples, order_rng, policy, optimizer, scheduler, tokenizer, device,
              metrics_log, rows_per_step: int) -> None:
    """Optimizer step `run.step`: its micro-batches from the shuffled order, one global normaliser, metrics."""
    step = run.step
    started = time.perf_counter()
    window = []
    for _ in range(cfg.gradient_accumulation_steps):
        rows = []
        while len(rows) < cfg.per_device_train_batch_size:
            if not run.order:
                run.order = list(range(len(examples)))
                order_rng.shuffle(run.order)
            rows.append(examples[run.order.pop()])
        window.append(collate(rows, tokenizer.pad_token_id, device))
    trained_tokens = sum(int((b.labels != IGNORE_INDEX).sum()) for b in window)  # the step's normaliser
    loss_total = torch.zeros((), device=device)
    for batch in window:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = answer_nll(policy, batch, cfg.logprob_chunk_size, cfg.share_prompt_forward) / trained_tokens
        loss.backward()
        loss_total += loss.detach()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], cfg.max_grad_norm))
    loss_value, learning_rate = float(loss_total), scheduler.get_last_lr()[0]
    run.losses.append(loss_value)
    skipped = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
    if skipped:  # weights and optimizer state stay as they were
        run.skips += 1
        log.warning("step %d: non-finite loss (%s) or gradient norm (%s); optimizer step skipped (%d in a row, "
                    "the run stops at %d)", step, loss_value, grad_norm, run.skips, cfg.max_consecutive_skips)
        if run.skips >= cfg.max_consecutive_skips:
            raise TrainingError(f"SFT stopped at step {step}: {run.skips} optimizer steps in a row had a non-finite "
                                "loss or gradient norm; final_model was not written (checkpoints written before "
                                "this step are kept). Lower learning_rate or max_grad_norm, or use bf16/fp32")
    else:
        optimizer.step()
        scheduler.step()
        run.skips = 0
    optimizer.zero_grad(set_to_none=True)
    run.seen_tokens += sum(int(b.attention_mask.sum()) for b in window)
    step_time = time.perf_counter() - started
    run.seconds += step_time
    metrics_log.log(step, {"loss": loss_value, "grad_norm": grad_norm, "learning_rate": learning_rate,
                           "tokens": float(trained_tokens), "num_tokens": float(run.seen_tokens),
                           "epoch": step * rows_per_step / len(examples), "skipped_step": float(skipped),
                           "step_time": step_time})
