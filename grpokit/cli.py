"""Command line: `grpokit train CONFIG [--set key=value ...] [--dry-run]`, `grpokit check CONFIG` (pre-flight).

Errors a user can fix (config, data, rewards) print one message and exit with status 2, no
traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from grpokit import __version__
from grpokit.errors import GrpokitError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpokit", description="GRPO fine-tuning for causal language models.")
    parser.add_argument("--version", action="version", version=f"grpokit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run GRPO training from a YAML/TOML config")
    train.add_argument("config", nargs="?", help="config file (.yaml, .yml or .toml); omitted: all defaults")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key; the value is parsed as YAML (repeatable)")
    train.add_argument("--dry-run", action="store_true", help="validate config, data and rewards, load nothing, train nothing")

    check = sub.add_parser("check", help="validate a config, print it resolved with each key's help, and run every "
                                         "reward on a few rows of data (no model is loaded)")
    check.add_argument("config", nargs="?", help="config file (.yaml, .yml or .toml)")
    check.add_argument("--rows", type=int, default=3, help="data rows the rewards are tried on (default 3)")
    check.add_argument("--quiet-config", action="store_true", help="skip printing the resolved config")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    check.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging()
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "check":
            return _check(args)
    except GrpokitError as exc:
        print(f"grpokit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("grpokit: interrupted", file=sys.stderr)
        return 130
    return 0


def _setup_logging() -> None:
    """Progress lines to stdout as plain text; warnings and errors to stderr, prefixed."""
    logger = logging.getLogger("grpokit")
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        out = logging.StreamHandler(sys.stdout)
        out.setLevel(logging.INFO)
        out.addFilter(lambda record: record.levelno < logging.WARNING)
        out.setFormatter(logging.Formatter("%(message)s"))
        err = logging.StreamHandler(sys.stderr)
        err.setLevel(logging.WARNING)
        err.setFormatter(logging.Formatter("grpokit: %(levelname)s: %(message)s"))
        logger.addHandler(out)
        logger.addHandler(err)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # weight-loading bars drown the run's own lines
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # and so do "Generating train split" bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _train(args) -> int:
    from grpokit.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from grpokit import data
        from grpokit.rewards import resolve_rewards

        train = data.dataset_records(cfg, "train")
        funcs = resolve_rewards(cfg.reward_funcs)
        for f in funcs:
            f.check_columns(train[0].keys())
        funcs = [f.name for f in funcs]
        held = data.dataset_records(cfg, "eval") or []
        print(cfg.to_yaml(), end="")
        print(f"dry run: {len(train)} train prompts, {len(held)} held-out, rewards {funcs}; nothing trained")
        return 0
    from grpokit.trainer import Trainer

    Trainer(cfg).train()
    return 0


def _check(args) -> int:
    from grpokit.config import GRPOConfig, describe_fields, load_config

    if args.help_config:
        print(describe_fields())
        return 0
    from grpokit.preflight import preflight

    cfg = load_config(args.config, args.overrides)
    if not args.quiet_config:
        for name, field in GRPOConfig.model_fields.items():
            print(f"{name}: {getattr(cfg, name)!r}  # {field.description}")
    report = preflight(cfg, rows=args.rows)
    print("\n".join(report.lines))
    return 0 if report.ok else 1
