"""grpokit vs TRL's GRPOTrainer: optimizer-step time, generation throughput and peak RSS.

Both frameworks train the same model on the same rows (grpokit's built-in arithmetic task,
written to a JSONL file) with the same reward (`number_match` below, or `digit_share` with
`--reward digit_share`), group size G, prompts per step, completion length, beta, learning rate, seed and
torch thread count, fp32 on CPU (or bf16 mixed precision in both with --bf16). Each generation feeds
exactly one optimizer step (one micro-batch of prompts x G completions, one iteration), so a step is:
sample, score, one forward/backward, one AdamW update. A group without reward spread has nothing to learn:
grpokit skips its rows' passes (their gradient is exactly zero), TRL runs them. The table gives the share
of such groups in each framework's measured steps.

Every run is a fresh subprocess; runs alternate (grpokit, TRL, grpokit, TRL, ...) so drift on a
shared machine hits both alike. Per run the first `--warmup` steps are dropped. Peak RSS is the
child's ru_maxrss from wait4 (the largest process of its tree, not a sum). Timings:
  grpokit  metrics.jsonl: step_time, time/generate, completion lengths (its own timers)
  TRL      a TrainerCallback (on_step_begin -> on_step_end) and a timer around
           `GRPOTrainer._generate_single_turn` (the `model.generate` call and its EOS masking)

By default every completion is exactly `--completion` tokens long in both: the benchmark's copy
of the model gets a tokenizer whose EOS is an added token with an id past the model's vocabulary,
so it can never be sampled. Both frameworks read EOS the same way (the tokenizer's plus
generation_config's), so neither stops early. `--natural-stops` keeps the model's own EOS;
compare the mean completion lengths then.

TRL is not a grpokit dependency: build its environment with benchmarks/setup_trl_env.sh.

Usage (from the repository root, with grpokit's venv):
  python benchmarks/vs_trl.py --model {tiny,30m,smollm2} --steps 5 --warmup 1 --rounds 3 \
      --trl-python .venv-trl/bin/python [--grpokit-src DIR] [--json out.json] [--frameworks grpokit]
      [--grpokit-set cpu_linear=torch]
  python benchmarks/vs_trl.py --report out.json     # the table of a finished or interrupted run
  --floors FLOORS.json (benchmarks/floors.py --json, SmolLM2 only) holds each step against this machine's floor:
  the longest completion's positions at the weight-read floor, the training rows' tokens at the GEMM peak.
Results and the machine they were measured on: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NEVER_TOKEN = "<|benchmark-never|>"
_NUMBER = re.compile(r"-?\d+")


def number_match(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the last integer in the completion equals the row's answer, else 0.0 (TRL's signature)."""
    scores = []
    for completion, expected in zip(completions, answer, strict=True):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        numbers = _NUMBER.findall(text)
        scores.append(1.0 if numbers and numbers[-1] == str(expected).strip() else 0.0)
    return scores


def digit_share(prompts, completions, **kwargs) -> list[float]:
    """The share of the completion's characters that are digits: a reward with spread in nearly every group, so
    every step trains (`number_match` is 0 for most groups of a small model: most steps have nothing to learn)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


REWARDS = {"number_match": number_match, "digit_share": digit_share}


# -- models (built with grpokit's environment) --------------------------------------------------

def build_model(kind: str, dest: Path, force_length: bool) -> Path:
    """Write the benchmark's model directory for `kind` under `dest` and return it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from grpokit.models.loading import resolve_model_path

    smollm2 = Path(resolve_model_path("smollm2-135m-instruct"))
    model_dir = dest / kind
    model_dir.mkdir(parents=True)
    if kind == "smollm2":
        for name in ("config.json", "model.safetensors"):
            (model_dir / name).symlink_to(smollm2 / name)
        tokenizer = AutoTokenizer.from_pretrained(smollm2)
        shutil.copy(smollm2 / "generation_config.json", model_dir / "generation_config.json")
    else:
        if kind == "tiny":
            # the test suite's tiny random Llama and character tokenizer, so the two stay one model
            sys.path.insert(0, str(REPO / "tests"))
            from conftest import build_tiny_model
            model, tokenizer = build_tiny_model(seed=0)
        else:  # "30m": SmolLM2's tokenizer and vocabulary, a small random decoder (~28M parameters)
            tokenizer = AutoTokenizer.from_pretrained(smollm2)
            torch.manual_seed(0)
            config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=384, intermediate_size=1024,
                                 num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                                 max_position_embeddings=2048, tie_word_embeddings=True,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            model = LlamaForCausalLM(config)
        model.save_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if force_length:
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        tokenizer.add_special_tokens({"eos_token": NEVER_TOKEN})
        if tokenizer.eos_token_id < vocab:
            raise RuntimeError(f"the added EOS got id {tokenizer.eos_token_id}, "
                               f"inside the model's vocabulary ({vocab})")
        gen_path = model_dir / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        gen["eos_token_id"] = tokenizer.eos_token_id
        gen_path.write_text(json.dumps(gen, indent=2))
    tokenizer.save_pretrained(model_dir)
    return model_dir


def write_rows(path: Path, count: int) -> Path:
    from grpokit.data.loading import read_rows

    rows = read_rows("arithmetic")[:count]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompt_lengths(model_dir: str, rows_path: str) -> list[int]:
    """Each row's prompt in tokens, as grpokit feeds it (TRL renders the same chat template)."""
    from transformers import AutoTokenizer

    from grpokit.data.loading import tokenise_prompts

    rows = [json.loads(line) for line in Path(rows_path).read_text().splitlines() if line.strip()]
    tokenised = tokenise_prompts(rows, AutoTokenizer.from_pretrained(model_dir), None, rows_path)
    return [len(ids) for ids in tokenised.prompt_ids]


def load_floors(path: str, model: str, precision: str) -> dict:
    """The floors a step is held against, from a `benchmarks/floors.py --json` file measured on this machine."""
    try:
        data = json.loads(Path(path).read_text())
        weights, bandwidth, gflops = data["weights"], data["read_bandwidth_gbs"], data["gemm_gflops"][precision]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--floors {path}: not a `benchmarks/floors.py --json` file ({type(exc).__name__}: {exc}); "
                         "write one with python benchmarks/floors.py --json FILE") from None
    if model != "smollm2" or data.get("model") != "smollm2-135m-instruct":
        raise SystemExit(f"--floors {path}: its floors are for {data.get('model')!r}; they apply to "
                         "--model smollm2 (SmolLM2-135M-Instruct) only")
    return {"file": Path(path).name, "weights": weights, "head_weights": _head_weights(),
            "read_bandwidth_gbs": bandwidth, "gemm_gflops": gflops, "bytes_per_weight": 2 if precision == "bf16" else 4}


def _head_weights() -> int:
    """SmolLM2-135M's LM head: vocabulary x hidden size (a prompt's tokens need no logits)."""
    from grpokit.models.loading import resolve_model_path

    config = json.loads((Path(resolve_model_path("smollm2-135m-instruct")) / "config.json").read_text())
    return config["vocab_size"] * config["hidden_size"]


def step_floor(step: dict, floors: dict, prompt_tokens: int, groups: int, group_size: int) -> float:
    """The least time this machine allows for a step's work, in seconds: every decode position reads the weights
    once (the prompt's pass, then one per further token of the longest completion), and the rows that train (those
    of groups with reward spread) take 6 FLOP per weight and token at the GEMM peak: their completions' tokens
    through every weight, their prompt once a group and without the LM head. `prompt_tokens` is the shortest
    prompt of the rows, so this is a lower bound."""
    read = floors["weights"] * floors["bytes_per_weight"] / (floors["read_bandwidth_gbs"] * 1e9)
    training_groups = groups * (1.0 - (step.get("zero_spread") or 0.0))
    flop = 6 * training_groups * (group_size * step["mean_length"] * floors["weights"]
                                  + prompt_tokens * (floors["weights"] - floors["head_weights"]))
    return step["max_length"] * read + flop / (floors["gemm_gflops"] * 1e9)


# -- one run of each framework --------------------------------------------------------------------

def _child_env(threads: int, extra_pythonpath: str | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    if extra_pythonpath:
        env["PYTHONPATH"] = extra_pythonpath
    return env


def _run_child(cmd: list[str], env: dict, log_path: Path, timeout: float) -> int:
    """Run `cmd` to completion; return its peak RSS in KiB (ru_maxrss of its process tree)."""
    with open(log_path, "w") as log:
        # not in the repository: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH,
        # so from the repository root the working tree's grpokit would shadow --grpokit-src
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=log_path.parent)
        deadline = time.monotonic() + timeout
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    proc.kill()
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.2)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): take the run down with us
            proc.kill()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}; log {log_path}:\n{tail}")
    return usage.ru_maxrss


def grpokit_origin(python: str, src: str | None, cwd: Path) -> str:
    """Which grpokit a grpokit run imports, as `run_grpokit` starts it (same interpreter, environment and working
    directory): "the working tree" or "--grpokit-src"; exits if --grpokit-src is given but another one would load."""
    probe = subprocess.run([python, "-c", "import grpokit; print(grpokit.__file__)"], env=_child_env(1, src),
                           cwd=cwd, capture_output=True, text=True)
    if probe.returncode != 0:
        raise SystemExit(f"{python} cannot import grpokit{f' from --grpokit-src {src}' if src else ''}:\n"
                         f"{probe.stderr.strip()[-1500:]}")
    origin = Path(probe.stdout.strip()).resolve()
    if src is None:
        return "the working tree" if origin.is_relative_to(REPO) else "an installed copy outside the repository"
    if not origin.is_relative_to(Path(src).resolve()):
        raise SystemExit(f"--grpokit-src {src}: a run would import grpokit from {origin} instead; give the directory "
                         "that holds the grpokit package (git archive COMMIT grpokit | tar -x -C DIR)")
    return "--grpokit-src"


def run_grpokit(spec: dict, work: Path, python: str, src: str | None) -> dict:
    import yaml

    out = work / "grpokit-out"
    config = {
        "model": spec["model_dir"], "dataset": spec["rows"], "eval_dataset": None,
        "reward_funcs": [{"func": f"{Path(__file__).resolve()}:{spec['reward']}", "name": spec["reward"]}],
        "num_generations": spec["G"], "per_device_train_batch_size": spec["prompts"] * spec["G"],
        "gradient_accumulation_steps": 1, "steps_per_generation": 1, "num_iterations": 1,
        "max_completion_length": spec["completion"], "temperature": 1.0, "top_p": 1.0, "top_k": 0,
        "beta": spec["beta"], "loss_type": "dapo", "scale_rewards": "group", "learning_rate": spec["lr"],
        "max_steps": spec["warmup"] + spec["steps"], "torch_dtype": "float32", "bf16": spec["bf16"],
        "gradient_checkpointing": False, "device": "cpu", "seed": spec["seed"], "output_dir": str(out),
        **{key: yaml.safe_load(value) for key, value in spec["grpokit_set"].items()},
    }
    config_path = work / "grpokit.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    rss = _run_child([python, "-m", "grpokit", "train", str(config_path)], _child_env(spec["threads"], src),
                     work / "grpokit.log", spec["timeout"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "step_time" in r]
    return {"peak_rss_kib": rss,
            "steps": [{"step_time": r["step_time"], "generate_time": r["time/generate"],
                       "tokens_per_second": r["tokens_per_second"], "mean_length": r["completions/mean_length"],
                       "max_length": r["completions/max_length"],
                       "zero_spread": r["frac_reward_zero_std"],
                       "timers": {k[len("time/"):]: v for k, v in r.items() if k.startswith("time/")}}
                      for r in steps]}


def run_trl(spec: dict, work: Path, python: str) -> dict:
    spec_path = work / "trl-spec.json"
    result_path = work / "trl-result.json"
    spec_path.write_text(json.dumps({**spec, "output_dir": str(work / "trl-out"), "result": str(result_path)}))
    rss = _run_child([python, str(Path(__file__).resolve()), "--trl-child", str(spec_path)],
                     _child_env(spec["threads"], None), work / "trl.log", spec["timeout"])
    return {"peak_rss_kib": rss, "steps": json.loads(result_path.read_text())["steps"]}


def trl_child(spec_path: str) -> None:
    """Runs inside TRL's environment: one GRPOTrainer run, per-step timings to spec['result']."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    rows = [json.loads(line) for line in Path(spec["rows"]).read_text().splitlines() if line.strip()]
    args = GRPOConfig(
        output_dir=spec["output_dir"], num_generations=spec["G"],
        per_device_train_batch_size=spec["prompts"] * spec["G"],
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        max_completion_length=spec["completion"], temperature=1.0, top_p=1.0, top_k=0,
        beta=spec["beta"], loss_type="dapo", scale_rewards="group", learning_rate=spec["lr"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=spec["warmup"] + spec["steps"], use_cpu=True, bf16=spec["bf16"], fp16=False,
        model_init_kwargs={"dtype": "float32"}, use_vllm=False, report_to="none", logging_steps=1,
        save_strategy="no", seed=spec["seed"], dataloader_num_workers=0, gradient_checkpointing=False,
    )
    generation = {"time": 0.0, "tokens": 0}
    reward = REWARDS[spec.get("reward", "number_match")]

    @functools.wraps(reward)
    def scored(*a, **kw):  # and the share of this step's groups without reward spread (nothing to learn)
        scores = reward(*a, **kw)
        groups = [scores[i:i + spec["G"]] for i in range(0, len(scores), spec["G"])]
        generation["zero_spread"] = sum(max(g) == min(g) for g in groups) / len(groups)
        return scores

    trainer = GRPOTrainer(model=spec["model_dir"], reward_funcs=scored, args=args,
                          train_dataset=Dataset.from_list(rows))
    generate_single_turn = trainer._generate_single_turn

    def timed_generate(*a, **kw):
        started = time.perf_counter()
        completion_ids, logprobs = generate_single_turn(*a, **kw)
        generation["time"] += time.perf_counter() - started
        generation["tokens"] += sum(len(c) for c in completion_ids)
        generation["count"] = len(completion_ids)
        generation["max"] = max([generation.get("max", 0), *(len(c) for c in completion_ids)])
        return completion_ids, logprobs

    trainer._generate_single_turn = timed_generate
    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            generation.update(time=0.0, tokens=0, count=0, max=0)
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            g_time = generation["time"]
            steps.append({"step_time": time.perf_counter() - self.started, "generate_time": g_time,
                          "tokens_per_second": generation["tokens"] / max(g_time, 1e-9),
                          "mean_length": generation["tokens"] / max(generation["count"], 1),
                          "max_length": generation["max"],
                          "zero_spread": generation.get("zero_spread")})

    trainer.add_callback(StepTimer())
    trainer.train()
    Path(spec["result"]).write_text(json.dumps({"steps": steps}))


# -- statistics and report ------------------------------------------------------------------------

def _spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def summarise(runs: list[dict], warmup: int, floor=None) -> dict:
    """Medians and spreads of the measured steps; with `floor` (a step -> seconds function), each step's floor
    and its time over it."""
    measured = [s for run in runs for s in run["steps"][warmup:]]
    col = {k: [s[k] for s in measured] for k in ("step_time", "generate_time", "tokens_per_second", "mean_length")}
    timers: dict[str, list[float]] = {}
    for step in measured:
        for k, v in step.get("timers", {}).items():
            timers.setdefault(k, []).append(v)
    zero_spread = [s["zero_spread"] for s in measured if s.get("zero_spread") is not None]  # older files lack it
    return {"runs": len(runs), "steps": len(measured), **col, "timers": timers,
            "peak_rss_mib": [run["peak_rss_kib"] / 1024 for run in runs],
            "zero_spread": statistics.mean(zero_spread) if zero_spread else None,
            **({"floor": [floor(s) for s in measured], "over_floor": [s["step_time"] / floor(s) for s in measured]}
               if floor else {})}


def table(summary: dict) -> str:
    lines = ["| framework | runs x steps | step time, s | generate time, s | generation tokens/s "
             "| peak RSS, MiB | mean completion length | groups without reward spread |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        silent = "n/a" if s.get("zero_spread") is None else f"{s['zero_spread']:.0%}"
        lines.append(f"| {name} | {s['runs']} x {s['steps'] // s['runs']} | {_spread(s['step_time'], '.2f')} "
                     f"| {_spread(s['generate_time'], '.2f')} | {_spread(s['tokens_per_second'], '.0f')} "
                     f"| {_spread(s['peak_rss_mib'], '.0f')} | {statistics.mean(s['mean_length']):.1f} | {silent} |")
    for name, s in summary.items():
        if s.get("timers"):  # grpokit's own timers: where the rest of its step goes
            parts = ", ".join(f"{k} {_spread(v, '.2f')}" for k, v in sorted(s["timers"].items()) if k != "generate")
            lines.append(f"\n{name} timers, s per step (median, min-max): {parts}")
    if {"grpokit", "trl"} <= summary.keys():
        def ratio(key: str) -> float:
            return statistics.median(summary["grpokit"][key]) / statistics.median(summary["trl"][key])

        lines.append(f"\ngrpokit / TRL median step time: {ratio('step_time'):.2f}; "
                     f"median peak RSS: {ratio('peak_rss_mib'):.2f}")
    for name, s in summary.items():
        if s.get("floor"):
            lines.append(f"\n{name} step floor, s: {_spread(s['floor'], '.2f')}; "
                         f"step / its floor: {_spread(s['over_floor'], '.2f')}")
    if "floor" in summary.get("trl", {}):
        # at TRL's own completions: how close to the floor a step 0.25x TRL's would have to run
        need = [0.25 * step / floor for step, floor in zip(summary["trl"]["step_time"], summary["trl"]["floor"])]
        lines.append(f"a step 0.25x TRL's, on TRL's completions, is {_spread(need, '.2f')} x their floor "
                     "(below 1: faster than the machine allows)")
    return "\n".join(lines)


def _repo_relative(path: str | None) -> str | None:
    """`path` relative to the repository when it lies inside it (a venv's python), else as given."""
    if path is None:
        return None
    try:
        return str(Path(os.path.abspath(path)).relative_to(REPO))
    except ValueError:
        return path


def _versions(trl_python: str | None, grpokit_src: str | None) -> dict:
    """Versions of this process's libraries and, when TRL runs (`trl_python` given), of TRL's environment."""
    trl_env = None
    if trl_python is not None:
        probe = ("import sys, torch, transformers, trl; "
                 "print(sys.version.split()[0], torch.__version__, transformers.__version__, trl.__version__)")
        py, torch_v, tf_v, trl_v = subprocess.run([trl_python, "-c", probe], capture_output=True, text=True,
                                                  check=True).stdout.split()
        trl_env = {"python": py, "torch": torch_v, "transformers": tf_v, "trl": trl_v}
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "repo_head": commit,
            "grpokit_benchmarked": grpokit_src or "the installed package (working tree)",
            "trl_env": trl_env}


def _uptime() -> str:
    return Path("/proc/loadavg").read_text().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "30m", "smollm2"], default="smollm2")
    parser.add_argument("--steps", type=int, default=5, help="measured optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="steps dropped at the start of each run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each framework, alternating")
    parser.add_argument("--G", type=int, default=8, help="num_generations")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per optimizer step")
    parser.add_argument("--completion", type=int, default=128, help="max_completion_length")
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 mixed precision in both (fp32 weights, bf16 autocast: `bf16: true` / bf16=True)")
    parser.add_argument("--grpokit-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a grpokit config setting on top of the benchmark's (e.g. cpu_linear=torch); repeatable")
    parser.add_argument("--frameworks", default="grpokit,trl", help="which to run, comma-separated")
    parser.add_argument("--natural-stops", action="store_true", help="keep the model's EOS (lengths may differ)")
    parser.add_argument("--reward", choices=sorted(REWARDS), default="number_match",
                        help="the reward in both (digit_share: spread in nearly every group, so every step trains)")
    parser.add_argument("--trl-python", default=".venv-trl/bin/python", help="python of TRL's venv")
    parser.add_argument("--grpokit-python", default=sys.executable)
    parser.add_argument("--grpokit-src", default=None,
                        help="directory holding the grpokit package to benchmark, e.g. an export of a commit: "
                             "git archive HEAD grpokit | tar -x -C DIR; "
                             "default: the installed one")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    parser.add_argument("--json", default=None, help="also write the raw timings here")
    parser.add_argument("--floors", default=None, metavar="JSON",
                        help="a `benchmarks/floors.py --json` file of this machine: report each step against its floor")
    parser.add_argument("--logs", default=None, help="copy each run's console log into this directory")
    parser.add_argument("--report", default=None, metavar="JSON", help="print the table of a saved --json and exit")
    parser.add_argument("--trl-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # absolute, not resolved (a venv's python is a symlink that must keep its name): the runs start elsewhere
    args.trl_python, args.grpokit_python = os.path.abspath(args.trl_python), os.path.abspath(args.grpokit_python)
    if args.trl_child:
        trl_child(args.trl_child)
        return
    if args.report:
        result = json.loads(Path(args.report).read_text())
        if args.floors:  # the same steps against another floors file (one measured when the machine was quieter)
            if "prompt_tokens_min" not in result:
                raise SystemExit(f"--report {args.report}: measured without --floors (no prompt lengths recorded); "
                                 "--floors applies to results of this version of the benchmark")
            precision = "bf16" if result["args"]["bf16"] else "float32"
            result["floors"] = load_floors(args.floors, result["args"]["model"], precision)
        report(result)
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the running child is killed too
    if args.logs:
        Path(args.logs).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as tmp:
        tmp = Path(tmp)
        spec = {"model_dir": str(build_model(args.model, tmp, force_length=not args.natural_stops)),
                "rows": str(write_rows(tmp / "rows.jsonl", 512)), "G": args.G, "prompts": args.prompts,
                "completion": args.completion, "beta": args.beta, "lr": args.lr, "threads": args.threads,
                "seed": args.seed, "warmup": args.warmup, "steps": args.steps, "timeout": args.timeout,
                "bf16": args.bf16, "grpokit_set": dict(item.split("=", 1) for item in args.grpokit_set),
                "reward": args.reward}
        chosen = args.frameworks.split(",")
        imported = grpokit_origin(args.grpokit_python, args.grpokit_src, tmp) if "grpokit" in chosen else None
        floors = {}
        if args.floors:
            floors = {"floors": load_floors(args.floors, args.model, "bf16" if args.bf16 else "float32"),
                      "prompt_tokens_min": min(prompt_lengths(spec["model_dir"], spec["rows"]))}
        shown = {k: _repo_relative(v) if k.endswith("_python") else v for k, v in vars(args).items()}
        info = {"args": shown,  # no path of this machine in a results file
                "versions": _versions(args.trl_python if "trl" in chosen else None, args.grpokit_src),
                "load_before": _uptime(), **floors, "grpokit_imported_from": imported,
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        runs: dict[str, list[dict]] = {name: [] for name in ("grpokit", "trl") if name in chosen}
        for r in range(args.rounds):
            for name in runs:
                work = tmp / f"{name}-{r}"
                work.mkdir()
                started = time.perf_counter()
                run = (run_grpokit(spec, work, args.grpokit_python, args.grpokit_src) if name == "grpokit"
                       else run_trl(spec, work, args.trl_python))
                if len(run["steps"]) != args.warmup + args.steps:
                    raise RuntimeError(f"{name} logged {len(run['steps'])} steps, "
                                       f"expected {args.warmup + args.steps}")
                runs[name].append(run)
                if args.json:  # after every run, so an interrupted benchmark keeps what it measured
                    Path(args.json).write_text(json.dumps({**info, "runs": runs}, indent=1))
                if args.logs:
                    for log in work.glob("*.log"):
                        shutil.copy(log, Path(args.logs) / f"{args.model}-{name}-{r}.log")
                shutil.rmtree(work)  # grpokit saves a final model; keep the disk free
                print(f"round {r + 1}/{args.rounds} {name}: {time.perf_counter() - started:.0f} s wall, "
                      f"steps {[round(s['step_time'], 2) for s in run['steps']]}, "
                      f"peak RSS {run['peak_rss_kib'] / 1024:.0f} MiB", flush=True)
        info["load_after"] = _uptime()
    if args.json:
        Path(args.json).write_text(json.dumps({**info, "runs": runs}, indent=1))
    report({**info, "runs": runs})


def report(result: dict) -> None:
    """Print the settings, machine load and table of one benchmark (a finished or interrupted one)."""
    a = result["args"]
    print(f"\nmodel {a['model']}, G={a['G']}, {a['prompts']} prompts/step, {a['completion']} tokens, "
          f"beta={a['beta']}, {'natural stops' if a['natural_stops'] else 'forced length'}, "
          f"reward {a.get('reward', 'number_match')}; "
          f"versions {result['versions']}" + (f"; grpokit imported from {result['grpokit_imported_from']}"
                                              if result.get("grpokit_imported_from") else ""))
    print(f"load average before: {result['load_before']}; after: {result.get('load_after', 'interrupted')}\n")
    floors, prompt_tokens = result.get("floors"), result.get("prompt_tokens_min")
    if floors:
        floors.setdefault("head_weights", _head_weights())  # the first results with floors did not record it
        print(f"floors ({floors['file']}): weights {floors['weights']:,}, "
              f"read {floors['read_bandwidth_gbs']:.1f} GB/s, GEMM {floors['gemm_gflops']:.0f} GFLOP/s; "
              f"shortest prompt {prompt_tokens} tokens\n")

    def floor(step: dict) -> float:
        return step_floor(step, floors, prompt_tokens, a["prompts"], a["G"])

    print(table({name: summarise(runs, a["warmup"], floor if floors else None)
                 for name, runs in result["runs"].items() if runs}))


if __name__ == "__main__":
    main()
