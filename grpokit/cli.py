"""Command line: `grpokit train CONFIG [--preset NAME] [--set key=value ...] [--dry-run]`, `grpokit check CONFIG`
(pre-flight), `eval` (`--compare`: two models side by side), `filter`, `generate`, `export`, `sft` (supervised
warm start), `report`, `vllm-serve`.

`train` also takes the math-QA trainer's options (--train-data, --num-samples, --kl-coef, ...): each
sets one config key (`TRAIN_OPTIONS`) and wins over the preset, the file and --set.

Errors a user can fix (config, data, rewards) print one message and exit with status 2, no
traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from grpokit import __version__
from grpokit.errors import ConfigError, GrpokitError, Interrupted, RewardError

# config.PRESETS, not imported: --help stays fast
PRESET_NAMES = ("default", "fast_test", "full_training", "low_memory", "from_sft")
# the math-QA trainer's options -> (config key, help); --no-lora, --reward-model, --batch-size, --no-4bit are special
TRAIN_OPTIONS = {
    "--train-data": ("dataset", "training data file (sets dataset)"),
    "--val-data": ("eval_dataset", "validation data file (sets eval_dataset)"),
    "--model-name": ("model", "Hub id or local model directory (sets model)"),
    "--sft-model": ("sft_model", "SFT checkpoint to start from (sets model; needed by --preset from_sft)"),
    "--num-samples": ("num_generations", "completions sampled per question (sets num_generations)"),
    "--kl-coef": ("beta", "KL coefficient (sets beta)"),
    "--epochs": ("num_train_epochs", "passes over the training data (sets num_train_epochs, replacing max_steps)"),
    "--lr": ("learning_rate", "learning rate (sets learning_rate)"),
    "--max-length": ("max_completion_length", "most tokens generated per answer (sets max_completion_length)"),
    "--output-dir": ("output_dir", "run directory (sets output_dir)"),
}
SFT_SKIPS = ("num_generations", "beta")  # GRPO-only options `grpokit sft` does not take


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _ints(value: str) -> list[int]:
    return [int(v) for v in _names(value)]


# `grpokit eval` options -> (config key, type, metavar, help)
EVAL_OPTIONS = {
    "--model": ("model", str, "PATH", "model to evaluate: Hub id or local directory (sets model)"),
    "--data": ("eval_dataset", str, "SPEC", "held-out data, any dataset form (sets eval_dataset)"),
    "--rewards": ("reward_funcs", _names, "A,B", "comma-separated rewards; the accuracy is eval_accuracy_reward, "
                  "default the first (sets reward_funcs)"),
    "--samples": ("eval_num_samples", int, "N",
                  "sampled completions per prompt for pass@k / maj@k (sets eval_num_samples)"),
    "--k": ("eval_pass_k", _ints, "K,K", "comma-separated k of pass@k and maj@k, e.g. 1,4,8 (sets eval_pass_k)"),
    "--limit": ("eval_limit", int, "N", "first N held-out prompts (sets eval_limit)"),
}
_TYPES = {"num_generations": int, "beta": float, "num_train_epochs": float, "learning_rate": float,
          "max_completion_length": int}


def _add_math_qa(parser: argparse.ArgumentParser, command: str) -> None:
    """The math-QA trainer's `--config PRESET|FILE` and options, on `train` and `sft` (whose batch counts rows)."""
    parser.add_argument("--config", dest="config_option", default=None, metavar="PRESET|FILE",
                        help="the math-QA trainer's spelling: a preset name (as --preset) or a config file (as CONFIG)")
    qa = parser.add_argument_group("math-QA trainer options (each sets one config key; wins over the file and --set)")
    for flag, (key, text) in TRAIN_OPTIONS.items():
        if command == "sft" and key in SFT_SKIPS:
            continue
        qa.add_argument(flag, dest=key, type=_TYPES.get(key, str), default=None, help=text)
    qa.add_argument("--batch-size", type=int, default=None,
                    help="rows per micro-batch (sets per_device_train_batch_size)" if command == "sft" else
                    "questions per micro-batch (sets per_device_train_batch_size = N x num_generations)")
    qa.add_argument("--no-lora", action="store_true", help="train all weights (sets use_peft false; LoRA is on only "
                                                          "where the preset or config turns it on)")
    qa.add_argument("--no-4bit", action="store_true",
                    help="load full-precision weights (load_in_4bit: false), over the config")
    if command == "sft":
        return
    qa.add_argument("--reward-model", choices=["heuristic", "learned"], default=None,
                    help="heuristic: reward_funcs [heuristic_math_qa]; learned: the reward_model built-in, "
                         "scoring with --reward-model-path")
    qa.add_argument("--reward-model-path", default=None,
                    help="sequence-classification model for --reward-model learned")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpokit", description="GRPO fine-tuning for causal language models.")
    parser.add_argument("--version", action="version", version=f"grpokit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run GRPO training from a YAML/TOML config")
    train.add_argument("config", nargs="?", help="config file (.yaml, .yml or .toml); omitted: all defaults")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key; the value is parsed as YAML (repeatable)")
    train.add_argument("--dry-run", action="store_true",
                       help="validate config, data and rewards, load nothing, train nothing")
    train.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                       help="go on from the newest checkpoint-N in output_dir, or from the checkpoint PATH")
    train.add_argument("--force", action="store_true",
                       help="with --resume: go on even though settings that change the results differ from the "
                       "checkpoint's")
    train.add_argument("--overwrite", action="store_true",
                       help="start anew in an output_dir that holds a run: the old run is moved, whole, to "
                            "OUTPUT_DIR.old-<time> (without it such a directory stops the run)")
    _add_preset(train)
    _add_math_qa(train, "train")

    check = sub.add_parser("check", help="validate a config, print it resolved with each key's help, and run every "
                                         "reward on a few rows of data (no model is loaded)")
    check.add_argument("config", nargs="?", help="config file (.yaml, .yml or .toml)")
    check.add_argument("--rows", type=int, default=3, help="data rows the rewards are tried on (default 3)")
    check.add_argument("--quiet-config", action="store_true", help="skip printing the resolved config")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    check.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    _add_preset(check)

    ev = sub.add_parser("eval", help="evaluate `model` on `eval_dataset`: greedy accuracy, pass@k and maj@k from "
                                     "samples, every reward's mean; --compare a second model with bootstrap CIs")
    ev.add_argument("config", nargs="?", help="config file (.yaml, .yml or .toml); each option below sets one key")
    _add_common(ev)
    for flag, (key, kind, metavar, text) in EVAL_OPTIONS.items():
        ev.add_argument(flag, dest=key, type=kind, default=None, metavar=metavar, help=text)
    ev.add_argument("--compare", metavar="OTHER_MODEL",
                    help="also evaluate OTHER_MODEL on the same prompts and sampling settings; print both, B - A and "
                    "its 95%% CI (paired bootstrap over prompts)")
    ev.add_argument("--output", metavar="FILE", help="also write the metrics as JSON to FILE (with --compare: both "
                    "models and the differences)")

    filt = sub.add_parser("filter", help="sample K completions per training prompt with `model`, score them with the "
                                         "accuracy reward, write the prompts solved sometimes but not always (JSONL)")
    filt.add_argument("config", nargs="?", help="config file (.yaml, .yml or .toml)")
    _add_common(filt)
    filt.add_argument("--samples", type=int, default=8, metavar="K", help="completions per prompt (default 8)")
    filt.add_argument("--output", required=True, metavar="FILE", help="JSONL: the dataset's rows plus pass_rate")
    filt.add_argument("--keep-all", action="store_true", help="keep every prompt, also those at pass rate 0 or 1")
    filt.add_argument("--limit", type=int, default=None, metavar="N", help="first N prompts of the dataset")

    gen = sub.add_parser("generate", help="sample completions of `model` for a dataset's prompts; print or write JSONL")
    gen.add_argument("config", nargs="?", help="config file (.yaml, .yml or .toml)")
    _add_common(gen)
    gen.add_argument("-n", "--num-completions", type=int, default=1, help="completions per prompt (default 1)")
    gen.add_argument("--limit", type=int, default=5, help="first N prompts of the dataset (default 5)")
    gen.add_argument("--split", choices=["train", "eval"], default="train",
                     help="dataset (train) or eval_dataset (eval)")
    gen.add_argument("--output", metavar="FILE", help="write JSONL rows {prompt, completion, finish_reason} to FILE")

    export = sub.add_parser("export", help="save a run's model as a plain HF directory (safetensors + tokenizer); "
                                           "--merge merges a LoRA adapter into its base (peft merge_and_unload)")
    export.add_argument("model_dir", help="a run's final_model, best_model or checkpoint-N directory")
    export.add_argument("output", nargs="?", default=None,
                        help="directory to write the model and tokenizer to (default: MODEL_DIR-merged beside it)")
    export.add_argument("--merge", action="store_true",
                        help="merge a LoRA adapter into its base model (needed for an adapter; a full model is copied)")
    export.add_argument("--base-model", default=None, metavar="PATH_OR_HUB_ID",
                        help="the adapter's base model, when its base_model_name_or_path moved or cannot be reached")

    from grpokit.rollout import vllm_server

    vllm_server.add_arguments(sub.add_parser(
        "vllm-serve", help="serve a model with vLLM for `use_vllm: true, vllm_mode: server` (extra `vllm`, a GPU)",
        description="Serve a model with vLLM for server-mode generation: the trainer sends prompt ids and pushes "
                    "its weights after each update (each push verified). Binds to 127.0.0.1 unless --host says "
                    "otherwise."))
    from grpokit.observe import report

    report.add_arguments(sub.add_parser(
        "report",
        help="write RUN_DIR/report.html: plots, sample completions, alerts and config of a run (opens offline)"))
    sft = sub.add_parser("sft", help="supervised fine-tuning before GRPO on the dataset's answers (sft_target_column) "
                                     "or 'messages' conversations; writes OUTPUT_DIR/final_model for --sft-model")
    sft.add_argument("config", nargs="?", help="config file (.yaml, .yml or .toml)")
    _add_common(sft)
    _add_math_qa(sft, "sft")
    sft.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                     help="go on from the newest checkpoint-N in output_dir, or from the checkpoint PATH")
    sft.add_argument("--force", action="store_true",
                     help="with --resume: go on even though settings that change the results differ from the "
                     "checkpoint's")
    sft.add_argument("--overwrite", action="store_true",
                     help="start anew in an output_dir that holds a run: the old run is moved, whole, to "
                          "OUTPUT_DIR.old-<time> (without it such a directory stops the run)")
    plan = sub.add_parser("plan", help="estimate memory (itemised) and tokens per step of a config from the model's "
                                       "config.json alone, and suggest settings that fit a memory budget")
    plan.add_argument("config", nargs="?", help="config file (.yaml, .yml or .toml); omitted: all defaults")
    _add_common(plan)
    plan.add_argument("--memory", default=None, metavar="SIZE",
                      help="memory budget, e.g. 16GiB, 24GB, 512MiB (default: CUDA device memory when the config "
                      "trains on cuda, else this machine's RAM)")
    return parser


def _add_preset(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help=f"start from a preset ({', '.join(PRESET_NAMES)}); the config file and --set override it")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key; the value is parsed as YAML (repeatable)")
    _add_preset(parser)


def cli_config(args: argparse.Namespace) -> dict:
    """The config keys the math-QA options on `train` set (the top layer, over preset, file and --set)."""
    out = {key: getattr(args, key) for key, _ in TRAIN_OPTIONS.values() if getattr(args, key, None) is not None}
    if getattr(args, "no_lora", False):
        out["use_peft"] = False
    if getattr(args, "no_4bit", False):
        out["load_in_4bit"] = False
    if getattr(args, "reward_model", None) == "heuristic":
        out["reward_funcs"] = ["heuristic_math_qa"]
    elif getattr(args, "reward_model", None) == "learned":
        if not args.reward_model_path:
            raise ConfigError("--reward-model learned needs --reward-model-path PATH (a sequence-classification model)")
        out["reward_funcs"] = [{"func": "reward_model", "args": {"model": args.reward_model_path}}]
    if getattr(args, "batch_size", None) is not None:  # resolved by load_config once num_generations is known
        from grpokit.config.loading import QUESTIONS

        out["per_device_train_batch_size"] = (QUESTIONS, args.batch_size)
    return out


def _config_option(args: argparse.Namespace) -> None:
    """`--config NAME` (the math-QA trainer's preset flag) or `--config FILE` -> args.preset / args.config."""
    value = getattr(args, "config_option", None)
    if value is None:
        return
    from pathlib import Path

    if Path(value).is_file() or Path(value).suffix.lower() in (".yaml", ".yml", ".toml"):
        if args.config is not None:
            raise ConfigError(f"two config files: {args.config} and --config {value}; give one")
        args.config = value
        return
    if args.preset is not None and args.preset != value:
        raise ConfigError(f"--config {value} and --preset {args.preset} both name a preset; give one")
    args.preset = value  # load_config reports an unknown preset with a did-you-mean


def _load(args: argparse.Namespace):
    from grpokit.config import load_config

    _config_option(args)
    command = "sft" if args.command == "sft" else "train"
    return load_config(args.config, args.overrides, preset=args.preset, cli=cli_config(args), command=command)


# commands that load a model restart once on tcmalloc where glibc would hold freed tensor memory
# (grpokit.runtime.allocator)
_LOADS_MODELS = {"train", "sft", "eval", "generate", "filter", "export"}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging()
    try:
        if argv is None and args.command in _LOADS_MODELS and not getattr(args, "dry_run", False):  # the program itself
            from grpokit.runtime import allocator

            library = allocator.choose()
            if library is not None:
                allocator.restart_with(library)
        if args.command == "train":
            return _train(args)
        if args.command == "check":
            return _check(args)
        if args.command == "report":
            from grpokit.observe import report

            return report.main(args)
        if args.command == "vllm-serve":
            from grpokit.rollout import vllm_server

            return vllm_server.main(args)
        commands = {"eval": _eval, "generate": _generate, "export": _export, "filter": _filter, "sft": _sft,
                    "plan": _plan}
        return commands[args.command](args)
    except Interrupted as exc:
        print(f"grpokit: {exc}", file=sys.stderr)
        return exc.exit_code
    except GrpokitError as exc:
        print(f"grpokit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("grpokit: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        from grpokit.runtime import distributed

        if not distributed.peer_lost(exc):
            raise
        print(f"grpokit: error: {distributed.peer_lost_message(exc)}", file=sys.stderr)
        return 1
    return 0


def _setup_logging() -> None:
    """Progress lines to stdout as plain text; warnings and errors to stderr, prefixed."""
    from grpokit.observe.progress import console_logging

    console_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # weight-loading bars drown the run's own lines
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # and so do "Generating train split" bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _resume_or_overwrite(args) -> None:
    if args.resume and args.overwrite:
        raise ConfigError("--resume goes on with the run in output_dir and --overwrite moves it aside; give one")


def _train(args) -> int:
    cfg = _load(args)
    if args.dry_run:  # the trainer's early checks and one call of each reward; nothing else
        from grpokit.evaluation.preflight import early_checks, probe_rewards
        from grpokit.models.loading import check_model_name

        inputs = early_checks(cfg, check_model=False)  # the model's path is checked after the rewards' report
        funcs = [f.name for f in inputs.reward_funcs]
        print(inputs.cfg.to_yaml(), end="")
        probe = probe_rewards(inputs, rows=2, other_forms=False)
        print("\n".join(probe.lines))
        if probe.uncallable:
            raise RewardError(f"dry run: reward(s) {probe.uncallable} failed on each kind of probe completion "
                              "(above), so training would stop at its first step; `grpokit check CONFIG` tries more "
                              "rows")
        if not probe.ok:
            logging.getLogger("grpokit.cli").warning(
                "dry run: %d reward call(s) failed on some probe completions (above); training counts such failures "
                "against reward_error_rate_limit", probe.problems)
        check_model_name(inputs.cfg.model)  # a local model directory that is not there: the run would stop at it
        validation = f", {len(inputs.validation_records)} validation" if inputs.validation_records else ""
        print(f"dry run: {len(inputs.train_records)} train prompts, {len(inputs.eval_records)} held-out{validation}, "
              f"rewards {funcs}; nothing trained")
        return 0
    if args.force and not args.resume:
        raise ConfigError("--force only applies with --resume")
    _resume_or_overwrite(args)
    from pathlib import Path

    if args.resume:  # a missing or foreign checkpoint is said before the model loads, and the settings given as
        # 'auto' take the checkpoint's values before anything (the 4-bit loading arguments) reads them
        from grpokit.runtime.distributed import rank
        from grpokit.train.harness import resume_checkpoint

        if rank() != 0:  # one process speaks for the job (as the trainer sets it)
            logging.getLogger("grpokit").setLevel(logging.WARNING)
        resume_checkpoint(cfg.settle_auto(cuda=False), args.resume)  # on a GPU: the checkpoint's, unasked
    from grpokit.runtime.distributed import rank
    from grpokit.train.harness import claim_output_dir

    claim_output_dir(Path(cfg.output_dir), resume=args.resume, overwrite=args.overwrite, command="train",
                     config_name=args.config or "CONFIG", main=rank() == 0)  # before the model loads
    from grpokit.train.trainer import Trainer

    Trainer(cfg).train(resume=args.resume, force=args.force)
    return 0


def _check(args) -> int:
    from grpokit.config import GRPOConfig, describe_fields, load_config

    if args.help_config:
        print(describe_fields())
        return 0
    from grpokit.evaluation.preflight import preflight

    cfg = load_config(args.config, args.overrides, preset=args.preset).settle_auto()  # printed as the run would
    if not args.quiet_config:
        for name, field in GRPOConfig.model_fields.items():
            print(f"{name}: {getattr(cfg, name)!r}  # {field.description}")
    report = preflight(cfg, rows=args.rows)
    print("\n".join(report.lines))
    return 0 if report.ok else 1


def _eval(args) -> int:
    import json
    from pathlib import Path

    from grpokit.config import load_config
    from grpokit.evaluation.evaluate import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, compare, jsonable
    from grpokit.evaluation.inference import evaluate_models

    cfg = load_config(args.config, args.overrides, preset=args.preset,
                      cli={key: getattr(args, key) for key, *_ in EVAL_OPTIONS.values()
                           if getattr(args, key) is not None})
    if args.eval_pass_k is not None and not cfg.eval_num_samples:
        raise ConfigError("eval: --k needs sampled completions; give --samples N (N >= the largest k)")
    results = evaluate_models(cfg, [cfg.model] + ([args.compare] if args.compare else []))
    if not args.compare:
        for key, value in results[0].metrics.items():
            print(f"{key}: {value:.4g}")
        output = jsonable(results[0].metrics)
    else:
        rows = compare(results[0], results[1])
        method = (f"95% percentile interval, paired bootstrap over prompts ({BOOTSTRAP_RESAMPLES} resamples, "
                  f"seed {BOOTSTRAP_SEED})")
        prompts = int(results[0].metrics["eval/num_prompts"])
        print(f"A: {cfg.model}\nB: {args.compare}\n{prompts} prompts; CI of B - A: {method}")
        print(f"{'metric':<42} {'A':>10} {'B':>10} {'B - A':>10}  95% CI")
        for key, row in rows.items():
            ci = "-" if row["ci95"] is None else f"[{row['ci95'][0]:+.4g}, {row['ci95'][1]:+.4g}]"
            print(f"{key:<42} {row['a']:>10.4g} {row['b']:>10.4g} {row['difference']:>+10.4g}  {ci}")
        output = jsonable({"model_a": {"model": cfg.model, "metrics": results[0].metrics},
                           "model_b": {"model": args.compare, "metrics": results[1].metrics},
                           "difference": rows, "ci95": method})
    if args.output:
        Path(args.output).write_text(json.dumps(output, indent=1) + "\n")
    return 0


def _filter(args) -> int:
    from pathlib import Path

    from grpokit.evaluation.inference import filter_by_pass_rate, write_jsonl

    if args.samples < 2 or (args.limit is not None and args.limit < 1):
        raise ConfigError("filter: --samples must be >= 2 (with one sample every pass rate is 0 or 1) and --limit >= 1")
    report = filter_by_pass_rate(_load(args), args.samples, args.limit, args.keep_all)
    write_jsonl(report.rows, Path(args.output))
    print(f"{report.prompts} prompts x {args.samples} samples: {report.all_correct} all correct, {report.all_wrong} "
          f"all wrong, {report.not_scored} not scored, "
          f"{report.prompts - report.all_correct - report.all_wrong - report.not_scored} mixed")
    print(f"wrote {len(report.rows)} {'rows' if args.keep_all else 'kept rows (0 < pass_rate < 1)'} to {args.output}")
    return 0


def _generate(args) -> int:
    import json
    from pathlib import Path

    from grpokit.evaluation.inference import generate, write_jsonl

    if args.num_completions < 1 or args.limit < 1:
        raise ConfigError("generate: --num-completions and --limit must be >= 1")
    rows = generate(_load(args), args.num_completions, args.limit, args.split)
    if args.output:
        write_jsonl(rows, Path(args.output))
        print(f"wrote {len(rows)} completions to {args.output}")
    else:
        for row in rows:
            print(json.dumps(row))
    return 0


def _sft(args) -> int:
    from grpokit.train.sft import run_sft

    if args.force and not args.resume:
        raise ConfigError("--force only applies with --resume")
    _resume_or_overwrite(args)
    run_sft(_load(args), config_name=args.config or "CONFIG", resume=args.resume, force=args.force,
            overwrite=args.overwrite)
    return 0


def _plan(args) -> int:
    from grpokit.evaluation import plan

    cfg = _load(args)
    try:
        budget, where = (plan.parse_size(args.memory), "--memory") if args.memory else plan.default_budget(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    estimate, suggestions = plan.plan(cfg, budget)
    print(plan.render(cfg, estimate, suggestions, budget, where))
    return 0


def _export(args) -> int:
    from pathlib import Path

    from grpokit.evaluation.inference import default_export_dir, export_merged

    if args.base_model and not args.merge:
        raise ConfigError("export: --base-model only applies with --merge")
    output = Path(args.output) if args.output else default_export_dir(Path(args.model_dir))
    action = export_merged(Path(args.model_dir), output, merge=args.merge, base_model=args.base_model)
    print(f"{action}; saved {output}")
    return 0
