"""Generation with vLLM: a client for `grpokit vllm-serve` (server mode) and an in-process engine (colocate).

Both implement the Engine protocol of base.py: token ids in, a `Rollout` out, prompt-major.
vLLM is imported only inside the functions that need it; server mode needs no vLLM on the trainer's side.

Weight sync (`load_weights`) sends the policy's weights under the base model's Hugging Face names
(`policy_weights`); a peft model's LoRA deltas are added to the base weights without touching the
policy, so the trainer's model is bit-for-bit what it was. A sync is verified before it is trusted:
- server mode: the trainer writes safetensors files into a directory the server can read, the server
  loads them into vLLM and answers with `weights_checksum` of the tensors it read; the trainer
  compares it with its own. The server also reads back every sent tensor whose name and shape match
  a vLLM parameter (up to `_VERIFY_SAMPLE` of them: layer norms always, embeddings and un-fused
  projections when vLLM keeps them whole) and refuses the sync if one differs or none can be compared.
- colocate: the same read-back runs on the in-process vLLM model (no checksum: hashing every weight
  on the CPU each step would cost seconds; the read-back compares on the GPU).

Departures from the in-process sampler (torch_engine.py), by vLLM's design:
- Recorded log-probs: vLLM is started with `logprobs_mode="processed_logprobs"`: the sampled token's
  log-prob under the distribution vLLM samples from, after temperature, repetition penalty and
  top-k / top-p / min-p. grpokit's convention is logits / temperature before penalty and filtering;
  the two are equal when no penalty or filter is set (repetition_penalty 1, top_k 0, top_p 1,
  min_p 0), the usual GRPO setting. With filters, vLLM's value is that of the renormalised filtered
  distribution (>= grpokit's). vLLM's default ("raw_logprobs") would instead ignore the temperature.
- Random streams: each prompt gets its own vLLM seed derived from (seed, prompt ids, repeat of that
  prompt); vLLM gives sample j of a request seed + j. Same prompts, params and seed give the same
  completions on the same vLLM build and GPU, but not the same as TorchEngine's.
- Stops: `ignore_eos=True` so that, as in TorchEngine, only `params.stop_token_ids` end a completion
  (the trainer passes eos there); the stop token is kept in the ids. A stop string ends the completion
  at the token that completed it (vLLM trims the text, not the ids).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import requests
import torch

from grpokit.errors import GrpokitError
from grpokit.rollout.base import FinishReason, Rollout, SamplingParams

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'grpokit[vllm]'"
_SHARD_BYTES = 1 << 30  # safetensors files written by a sync hold at most ~1 GiB each (bounds the CPU copy)
_VERIFY_SAMPLE = 16  # sent tensors read back from vLLM's model after a sync
_WORKER_EXTENSION = "grpokit.rollout.vllm_engine.WeightSyncExtension"


class EngineError(GrpokitError):
    """The generation engine failed: unreachable, wrong model, an error answer, or an unverified weight sync."""


# ---------------------------------------------------------------------------------------------- weights

def policy_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of the weights vLLM must hold: the base model's HF names, LoRA merged.

    For a peft model, each LoRA layer's base weight gets its active adapters' `get_delta_weight`
    added (a new tensor: the policy is not modified, unlike `merge_adapter()` + `unmerge_adapter()`,
    whose round trip is not exact in low precision); adapter tensors are dropped and peft's name
    prefixes (`base_model.model.`, `.base_layer`, `modules_to_save.<adapter>`) removed.
    Tied weights appear under each of their names (vLLM skips the ones it ties itself).
    """
    state = model.state_dict()
    if not hasattr(model, "peft_config"):
        for name, tensor in state.items():
            yield name, tensor.detach()
        return
    from peft.tuners.lora import LoraLayer

    deltas: dict[str, torch.Tensor] = {}
    adapters: set[str] = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if any(module.use_dora.get(a, False) for a in module.active_adapters):
            raise EngineError(f"{module_name}: DoRA adapters cannot be synced to vLLM yet; train plain LoRA "
                              "(use_dora: false) or use the in-process engine (use_vllm: false)")
        if module.merged or module.disable_adapters:
            continue  # merged: already in the base weight; disabled: the base weight is what generates
        with torch.no_grad():
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
        if isinstance(delta, torch.Tensor):
            deltas[f"{module_name}.base_layer.weight"] = delta
        adapters.update(module.active_adapters)
    for name, tensor in state.items():
        if ".lora_" in name or ".original_module." in name:
            continue
        if name in deltas:
            tensor = tensor + deltas[name].to(tensor.dtype)
        clean = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        for adapter in adapters:
            clean = clean.replace(f".modules_to_save.{adapter}.", ".")
        yield clean, tensor.detach()


class WeightsChecksum:
    """sha256 identifying a set of named tensors, independent of their order and of how they were sharded.

    Each tensor: sha256(name, NUL, dtype (e.g. "torch.bfloat16"), NUL, shape ("2,3"), NUL, its bytes
    in C order); the checksum: sha256 over (name, NUL, tensor digest) in ascending name order, as hex.
    """

    def __init__(self):
        self.digests: dict[str, bytes] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.digests:
            raise EngineError(f"weight sync: tensor '{name}' appears twice")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest = hashlib.sha256(f"{name}\0{tensor.dtype}\0{','.join(map(str, tensor.shape))}\0".encode())
        digest.update(flat.numpy().data)
        self.digests[name] = digest.digest()

    def hexdigest(self) -> str:
        total = hashlib.sha256()
        for name in sorted(self.digests):
            total.update(name.encode() + b"\0" + self.digests[name])
        return total.hexdigest()


def weights_checksum(weights: Iterable[tuple[str, torch.Tensor]]) -> str:
    checksum = WeightsChecksum()
    for name, tensor in weights:
        checksum.add(name, tensor)
    return checksum.hexdigest()


def write_safetensors(weights: Iterable[tuple[str, torch.Tensor]], directory: str | Path) -> str:
    """Write the weights as shard-NNNNN.safetensors files (CPU copies, ~1 GiB each); returns their checksum."""
    from safetensors.torch import save_file

    checksum = WeightsChecksum()
    shard: dict[str, torch.Tensor] = {}
    size = index = 0
    for name, tensor in weights:
        copy = tensor.detach().to("cpu", copy=True).contiguous()  # own storage: safetensors refuses shared tensors
        checksum.add(name, copy)
        shard[name] = copy
        size += copy.numel() * copy.element_size()
        if size >= _SHARD_BYTES:
            save_file(shard, str(Path(directory) / f"shard-{index:05d}.safetensors"))
            shard, size, index = {}, 0, index + 1
    if shard or index == 0:
        save_file(shard, str(Path(directory) / f"shard-{index:05d}.safetensors"))
    return checksum.hexdigest()


def read_safetensors(directory: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of every *.safetensors file in `directory`, on the CPU, file by file in name order."""
    from safetensors import safe_open

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise EngineError(f"weight sync: no *.safetensors file in {directory} (is it a directory the trainer "
                          "and the server both see? set the engine's shared_dir)")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def load_and_verify(vllm_model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]], *,
                    with_checksum: bool) -> tuple[str | None, int]:
    """Push weights into a vLLM model with its `load_weights`, then read back a sample; (checksum or None, verified).

    The sample: the first `_VERIFY_SAMPLE` sent tensors whose name and shape match a vLLM parameter.
    Raises EngineError if one of them differs from vLLM's parameter (after casting to its dtype), or
    if no sent tensor can be compared (names that vLLM does not know, e.g. left-over peft prefixes).
    """
    params = dict(vllm_model.named_parameters())
    checksum = WeightsChecksum() if with_checksum else None
    sample: dict[str, torch.Tensor] = {}
    names: list[str] = []

    def tee() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            names.append(name)
            if checksum is not None:
                checksum.add(name, tensor)
            if len(sample) < _VERIFY_SAMPLE and name in params and params[name].shape == tensor.shape:
                sample[name] = tensor
            yield name, tensor

    with torch.no_grad():
        vllm_model.load_weights(tee())
        for name, sent in sample.items():
            held = params[name].data
            if not torch.equal(held, sent.to(device=held.device, dtype=held.dtype)):
                raise EngineError(f"weight sync not verified: after loading, vLLM's '{name}' differs from the tensor "
                                  "sent (vLLM did not load it, or transforms it on load); generation would not use "
                                  "the trainer's weights")
    if not sample:
        raise EngineError(f"weight sync not verified: none of the {len(names)} tensors sent (e.g. {names[:3]}) has "
                          f"the name and shape of a vLLM parameter (e.g. {list(params)[:3]}); the names must be the "
                          "base model's Hugging Face names")
    return (checksum.hexdigest() if checksum is not None else None), len(sample)


class WeightSyncExtension:
    """Methods vLLM adds to each of its workers (`LLM(worker_extension_cls=...)`), called with `llm.collective_rpc`."""

    def _grpokit_model(self) -> torch.nn.Module:
        runner = self.model_runner  # type: ignore[attr-defined]  # the vLLM worker this class is mixed into
        return runner.get_model() if hasattr(runner, "get_model") else runner.model

    def grpokit_load_from_dir(self, path: str) -> tuple[str | None, int]:
        return load_and_verify(self._grpokit_model(), read_safetensors(path), with_checksum=True)

    def grpokit_load_tensors(self, weights: list[tuple[str, torch.Tensor]]) -> tuple[str | None, int]:
        return load_and_verify(self._grpokit_model(), weights, with_checksum=False)


# --------------------------------------------------------------------------------------------- sampling

def vllm_sampling_params(params: SamplingParams, n: int, seed: int | None):
    """grpokit SamplingParams -> vllm.SamplingParams for n samples of one prompt (see the module docstring)."""
    vllm = import_vllm()
    return vllm.SamplingParams(
        n=n, max_tokens=params.max_tokens, temperature=params.temperature,  # vLLM: temperature 0 is greedy
        top_p=params.top_p, top_k=params.top_k if params.top_k > 0 else -1,  # -1 disables top-k in every vLLM >= 0.10
        min_p=params.min_p, repetition_penalty=params.repetition_penalty, seed=seed,
        stop=list(params.stop) or None, stop_token_ids=list(params.stop_token_ids) or None, ignore_eos=True,
        logprobs=0,  # only the sampled token's log-prob
        detokenize=bool(params.stop),  # stop strings are matched in the text; ids need no text otherwise
    )


def prompt_seeds(prompt_ids: list[list[int]], seed: int | None) -> list[int]:
    """One vLLM seed per prompt from (seed, prompt ids, repeat of that prompt in the batch); random when seed is None.

    Spread over 2**62 values so that prompt seeds + sample index (vLLM's per-sample seeds) do not overlap in practice.
    """
    base = secrets.randbits(63) if seed is None else seed
    occurrences: dict[tuple[int, ...], int] = {}
    seeds = []
    for ids in prompt_ids:
        key = tuple(ids)
        repeat = occurrences.get(key, 0)
        occurrences[key] = repeat + 1
        digest = hashlib.blake2b(repr(("vllm", base, key, repeat)).encode(), digest_size=8).digest()
        seeds.append(int.from_bytes(digest, "little") >> 2)
    return seeds


def rollout_from_outputs(outputs: list[Any], n: int) -> Rollout:
    """vLLM RequestOutputs (one per prompt, in prompt order) -> a prompt-major Rollout."""
    completion_ids: list[list[int]] = []
    sampler_logps: list[list[float]] = []
    finish_reasons: list[FinishReason] = []
    for request in outputs:
        samples = sorted(request.outputs, key=lambda c: c.index)
        if len(samples) != n:
            raise EngineError(f"vLLM returned {len(samples)} completions for a prompt, expected n={n}")
        for completion in samples:
            ids = list(completion.token_ids)
            if completion.logprobs is None or len(completion.logprobs) != len(ids):
                raise EngineError("vLLM returned no log-prob for some sampled tokens (was logprobs=0 set?)")
            completion_ids.append(ids)
            sampler_logps.append([float(step[token].logprob)
                                  for step, token in zip(completion.logprobs, ids, strict=True)])
            finish_reasons.append(normalise_finish_reason(completion.finish_reason))
    return Rollout(completion_ids=completion_ids, sampler_logps=sampler_logps, finish_reasons=finish_reasons,
                   group_size=n)


def normalise_finish_reason(reason: str | None) -> FinishReason:
    if reason == "length":
        return "length"
    if reason == "stop":  # an eos / stop token or a stop string
        return "stop"
    raise EngineError(f"vLLM ended a completion with finish reason {reason!r} (expected 'stop' or 'length'); "
                      "the request was aborted or is unfinished")


def vllm_generate(llm: Any, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> Rollout:
    """Generate with a vllm.LLM from token ids; shared by the colocate engine and `grpokit vllm-serve`."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate() needs at least one prompt, each with at least one token")
    per_prompt = [vllm_sampling_params(params, n, seed) for seed in prompt_seeds(prompt_ids, params.seed)]
    prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]  # vllm.inputs.TokensPrompt is this TypedDict
    outputs = llm.generate(prompts, sampling_params=per_prompt, use_tqdm=False)
    return rollout_from_outputs(outputs, n)


def import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise EngineError(f"use_vllm: vLLM is not installed ({exc}); install it with {INSTALL_HINT} "
                          "(needs a CUDA GPU), or set use_vllm: false for the in-process sampler") from exc
    return vllm


def new_llm(model: str, *, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
            max_model_len: int | None = None, dtype: str = "auto", seed: int | None = None,
            enable_sleep_mode: bool = False, enable_prefix_caching: bool | None = None):
    """A vllm.LLM set up for grpokit: processed log-probs (see the module docstring) and the weight-sync extension.
    `enable_prefix_caching` None leaves vLLM's default."""
    vllm = import_vllm()
    extra = {} if enable_prefix_caching is None else {"enable_prefix_caching": enable_prefix_caching}
    return vllm.LLM(model=model, tensor_parallel_size=tensor_parallel_size,
                    gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, dtype=dtype,
                    seed=seed if seed is not None else 0, enable_sleep_mode=enable_sleep_mode,
                    logprobs_mode="processed_logprobs", worker_extension_cls=_WORKER_EXTENSION, **extra)


# ---------------------------------------------------------------------------------------------- engines

class VLLMServerEngine:
    """Client of `grpokit vllm-serve`. Every request has a deadline; every error names the server and what to do.

    `model` is compared with the server's `--model` exactly as both were given (no path resolution:
    "Qwen/Qwen2.5-0.5B" and a local copy of it are different models here).
    `shared_dir`: where weight syncs are written; the server must see it under the same path
    (default: the system temp directory, which works when both run on one machine).
    `wait_s`: how long to keep retrying /health while the server starts (0: one attempt).
    """

    def __init__(self, base_url: str, *, model: str, timeout_s: float = 600, connect_timeout_s: float = 10,
                 shared_dir: str | None = None, wait_s: float = 0.0):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.shared_dir = shared_dir
        self.session = requests.Session()
        deadline = time.monotonic() + wait_s
        while True:
            try:
                health = self._request("GET", "/health", read_timeout_s=connect_timeout_s)
                break
            except EngineError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(1.0)
        if health.get("model") != model:
            raise EngineError(f"the vLLM server at {self.base_url} serves model {health.get('model')!r}, but this run "
                              f"trains {model!r}: restart it with `grpokit vllm-serve --model {model}` (names are "
                              "compared as given), or point vllm_host/vllm_port at the right server")

    def _request(self, method: str, path: str, payload: dict | None = None, *, read_timeout_s: float) -> dict:
        url = self.base_url + path
        # network failures are the expected faults here: each becomes an EngineError that says what to do
        try:
            answer = self.session.request(method, url, json=payload, timeout=(self.connect_timeout_s, read_timeout_s))
        except requests.exceptions.ConnectTimeout as exc:
            raise self._unreachable(url, exc) from exc
        except requests.exceptions.Timeout as exc:  # ReadTimeout: connected, no answer in time
            raise self._late(url, read_timeout_s) from exc
        except requests.exceptions.ConnectionError as exc:
            raise self._unreachable(url, exc) from exc
        try:
            body = answer.json()
        except ValueError:
            body = {"error": answer.text[:500]}
        if answer.status_code != 200:
            error = body.get("error", body) if isinstance(body, dict) else body
            raise EngineError(f"vLLM server {url} answered HTTP {answer.status_code}: {error}")
        if not isinstance(body, dict):
            raise EngineError(f"vLLM server {url} answered {str(body)[:200]!r}, expected a JSON object")
        return body

    def _unreachable(self, url: str, exc: Exception) -> EngineError:
        port = self.base_url.rsplit(":", 1)[-1].split("/")[0]
        return EngineError(f"no vLLM server answered at {url} within {self.connect_timeout_s:g} s "
                           f"({type(exc).__name__}); "
                           f"start it with `grpokit vllm-serve --model {self.model} --host 127.0.0.1 --port {port}` "
                           "(and check vllm_host / vllm_port)")

    def _late(self, url: str, read_timeout_s: float) -> EngineError:
        return EngineError(f"vLLM server {url} did not answer within the {read_timeout_s:g} s deadline; it may be "
                           "overloaded or stuck: check its log, or raise the engine's timeout_s for long generations")

    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> Rollout:
        payload = {"prompt_ids": prompt_ids, "n": n, "params": sampling_params_to_json(params)}
        body = self._request("POST", "/generate", payload, read_timeout_s=self.timeout_s)
        return rollout_from_json(body, len(prompt_ids), n, self.base_url)

    def load_weights(self, model: torch.nn.Module) -> None:
        directory = tempfile.mkdtemp(prefix="grpokit-sync-", dir=self.shared_dir)
        try:
            checksum = write_safetensors(policy_weights(model), directory)
            body = self._request("POST", "/load_weights", {"path": directory, "checksum": checksum},
                                 read_timeout_s=self.timeout_s)
            if body.get("checksum") != checksum:
                raise EngineError(f"weight sync to {self.base_url} not verified: the trainer sent checksum {checksum}, "
                                  f"the server loaded {body.get('checksum')!r} from {directory}; generation would not "
                                  "use the trainer's weights. Check that the server sees the same files (shared_dir) "
                                  "and runs the same grpokit version")
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def close(self) -> None:
        self.session.close()


def sampling_params_to_json(params: SamplingParams) -> dict:
    """The fields the server reads; not `entropies`, which vLLM does not give (a server of a grpokit without the
    field would refuse it)."""
    return {name: getattr(params, name) for name in SamplingParams.__dataclass_fields__ if name != "entropies"}


def rollout_from_json(body: dict, prompts: int, n: int, where: str) -> Rollout:
    """Check the shape of a /generate answer (B*n rows, one log-prob per token, known finish reasons)."""
    try:
        ids, logps, reasons = body["completion_ids"], body["logprobs"], body["finish_reasons"]
        rows = prompts * n
        ok = (len(ids) == len(logps) == len(reasons) == rows
              and all(len(i) == len(lp) for i, lp in zip(ids, logps, strict=True))
              and all(r in ("stop", "length") for r in reasons))
    except (KeyError, TypeError) as exc:
        raise EngineError(f"vLLM server {where}: malformed /generate answer ({exc!r})") from exc
    if not ok:
        raise EngineError(f"vLLM server {where}: /generate answer does not match the request ({prompts} prompts x "
                          f"n={n}: expected {prompts * n} rows of ids, one log-prob per id, "
                          "finish reasons stop/length)")
    return Rollout(completion_ids=[[int(t) for t in row] for row in ids],
                   sampler_logps=[[float(x) for x in row] for row in logps], finish_reasons=list(reasons), group_size=n)


class VLLMColocateEngine:
    """vLLM inside the trainer process, on the trainer's GPU (tensor_parallel_size 1).

    With sleep_mode, vLLM's weights and KV cache leave the GPU after each generate (`llm.sleep(level=1)`)
    and come back before the next load_weights or generate (`llm.wake_up()`), so training has the memory.
    """

    def __init__(self, model_path: str, *, gpu_memory_utilization: float = 0.9, tensor_parallel_size: int = 1,
                 max_model_len: int | None = None, dtype: str = "auto", seed: int | None = None,
                 sleep_mode: bool = False, prefix_caching: bool | None = None):
        if tensor_parallel_size != 1:
            raise EngineError(f"vllm_mode: colocate runs vLLM in the trainer's process on one GPU; "
                              f"vllm_tensor_parallel_size={tensor_parallel_size} needs vllm_mode: server "
                              "(`grpokit vllm-serve --tensor-parallel-size N`)")
        # the engine core in this process: weight sync passes tensors to the worker without copying them
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.sleep_mode = sleep_mode
        self.asleep = False
        self.llm = new_llm(model_path, tensor_parallel_size=1, gpu_memory_utilization=gpu_memory_utilization,
                           max_model_len=max_model_len, dtype=dtype, seed=seed, enable_sleep_mode=sleep_mode,
                           enable_prefix_caching=prefix_caching)

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> Rollout:
        self._wake()
        try:
            return vllm_generate(self.llm, prompt_ids, n, params)
        finally:
            if self.sleep_mode:
                self.llm.sleep(level=1)
                self.asleep = True

    def load_weights(self, model: torch.nn.Module) -> None:
        self._wake()
        results = self.llm.collective_rpc("grpokit_load_tensors", args=(list(policy_weights(model)),))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        verified = [count for _, count in results]
        log.debug("vLLM weight sync: %s tensors read back per worker", verified)

    def close(self) -> None:
        self.llm = None


def check_server(cfg: Any) -> None:
    """use_vllm in server mode: the server answers /health at vllm_host:vllm_port and serves `cfg.model`, or an
    `EngineError` says what to start (the early checks call it, so a dry run finds what the run would stop at after
    loading its model)."""
    if cfg.use_vllm and cfg.vllm_mode == "server":
        VLLMServerEngine(f"http://{cfg.vllm_host}:{cfg.vllm_port}", model=cfg.model).session.close()


# what sizes a vLLM engine -> its `grpokit vllm-serve` flag: in server mode the server's, set when it starts
_SERVER_SIZING = {"vllm_gpu_memory_utilization": "--gpu-memory-utilization",
                  "vllm_tensor_parallel_size": "--tensor-parallel-size", "vllm_max_model_len": "--max-model-len"}


def make_engine(cfg: Any, model_path: str, policy: torch.nn.Module | None = None):
    """The vLLM engine the config asks for, or None when `cfg.use_vllm` is false (keep the in-process engine).

    Reads use_vllm, vllm_mode, vllm_host, vllm_port, vllm_gpu_memory_utilization, vllm_tensor_parallel_size,
    vllm_max_model_len, seed, model (server mode compares it with the server's --model), torch_dtype,
    vllm_dtype, vllm_enable_prefix_caching and vllm_enable_sleep_mode (each when present; a server has its own
    dtype, prefix caching, memory share, tensor parallelism and context length, set by `grpokit vllm-serve`, so in
    server mode each of them the run sets gets a warning naming the server's flag). With `policy`, its
    weights are synced (and verified) at once, so generation starts from the trainer's weights even when they
    differ from `model_path`'s.
    """
    if not cfg.use_vllm:
        return None
    server_side = {key: getattr(cfg, key, None) for key in ("vllm_dtype", "vllm_enable_prefix_caching")}
    if cfg.vllm_mode == "server":
        given = getattr(cfg, "model_fields_set", None)  # a GRPOConfig: the keys the run set (preset, file, --set)
        sizing = {key: getattr(cfg, key) for key in _SERVER_SIZING
                  if hasattr(cfg, key) and (key in given if given is not None else getattr(cfg, key) is not None)}
        for key, value in {**server_side, **sizing}.items():
            if value is not None:
                flag = _SERVER_SIZING.get(key) or {"vllm_dtype": "--dtype"}.get(key)
                flag = f"{flag} {value}" if flag else (
                    "--enable-prefix-caching" if value else "--no-enable-prefix-caching")
                log.warning("%s: %s is the server's setting in vllm_mode: server; start it with "
                            "`grpokit vllm-serve ... %s` (this run cannot change it)", key, value, flag)
        engine = VLLMServerEngine(f"http://{cfg.vllm_host}:{cfg.vllm_port}", model=cfg.model)
    else:
        if not torch.cuda.is_available():
            raise EngineError("vllm_mode: colocate needs a CUDA GPU in this process and torch.cuda.is_available() is "
                              "False; use vllm_mode: server with a GPU machine, or use_vllm: false")
        import_vllm()
        dtype = server_side["vllm_dtype"] or getattr(cfg, "torch_dtype", "auto")
        if dtype == "float64":
            raise EngineError("use_vllm: vLLM cannot run float64; set torch_dtype to float32 or bfloat16, "
                              "or use_vllm: false")
        engine = VLLMColocateEngine(model_path, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                                    tensor_parallel_size=cfg.vllm_tensor_parallel_size,
                                    max_model_len=cfg.vllm_max_model_len, dtype=dtype, seed=cfg.seed,
                                    sleep_mode=getattr(cfg, "vllm_enable_sleep_mode", False),
                                    prefix_caching=server_side["vllm_enable_prefix_caching"])
    if policy is not None:
        engine.load_weights(policy)
    return engine
