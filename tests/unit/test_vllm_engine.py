"""vLLM engines: the HTTP server and its client with fake backends, weight-sync checksums, the conversion
to vLLM's SamplingParams against a fake `vllm` module, and (GPU + vLLM only) a real colocate run."""

from __future__ import annotations

import argparse
import importlib.util
import socket
import sys
import time
import types
from types import SimpleNamespace

import pytest
import requests
import torch

from grpokit.errors import GrpokitError
from grpokit.rollout import vllm_engine, vllm_server
from grpokit.rollout.base import Rollout, SamplingParams
from grpokit.rollout.vllm_engine import (
    EngineError,
    VLLMColocateEngine,
    VLLMServerEngine,
    WeightSyncExtension,
    make_engine,
    policy_weights,
    read_safetensors,
    weights_checksum,
)
from tests.conftest import build_tiny_model


class FakeBackend:
    """Completions derived from the prompt: sample j of prompt p is [p[0], j, 0 * j]; logprob -0.1 * position."""

    def __init__(self, model="tiny", delay_s=0.0, fail=None, checksum=None):
        self.model = model
        self.delay_s = delay_s
        self.fail = fail
        self.checksum = checksum
        self.calls = []
        self.loaded = None

    def generate(self, prompt_ids, n, params):
        self.calls.append((prompt_ids, n, params))
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError(self.fail)
        ids, logps, reasons = [], [], []
        for p in prompt_ids:
            for j in range(n):
                length = 2 + j
                ids.append([p[0], j] + [0] * j)
                logps.append([-0.1 * k for k in range(length)])
                reasons.append("stop" if j % 2 else "length")
        return Rollout(completion_ids=ids, sampler_logps=logps, finish_reasons=reasons, group_size=n)

    def load_weights(self, path):
        self.loaded = dict(read_safetensors(path))
        return self.checksum if self.checksum is not None else weights_checksum(self.loaded.items())


@pytest.fixture
def serve():
    servers = []

    def start(backend):
        server = vllm_server.serve(backend, "127.0.0.1", 0)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_generate_round_trip_is_prompt_major_with_the_params_sent(serve):
    backend = FakeBackend()
    server = serve(backend)
    engine = VLLMServerEngine(server.url, model="tiny")
    params = SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.1,
                            stop_token_ids=[1, 2], stop=["\n\n"], seed=123)
    rollout = engine.generate([[7, 8], [9]], 3, params)
    assert rollout.group_size == 3
    assert [row[:2] for row in rollout.completion_ids] == [[7, 0], [7, 1], [7, 2], [9, 0], [9, 1], [9, 2]]
    assert rollout.finish_reasons == ["length", "stop", "length"] * 2
    assert [len(r) for r in rollout.sampler_logps] == [len(r) for r in rollout.completion_ids] == [2, 3, 4] * 2
    assert rollout.sampler_logps[2] == pytest.approx([0.0, -0.1, -0.2, -0.3])
    (sent_ids, sent_n, sent_params), = backend.calls
    assert sent_ids == [[7, 8], [9]] and sent_n == 3 and sent_params == params


def test_load_weights_sends_the_model_and_the_checksums_match(serve):
    backend = FakeBackend()
    server = serve(backend)
    model, _ = build_tiny_model()
    VLLMServerEngine(server.url, model="tiny").load_weights(model)
    assert set(backend.loaded) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(backend.loaded[name], tensor), name


def test_a_wrong_checksum_from_the_server_is_an_unverified_sync(serve):
    server = serve(FakeBackend(checksum="0" * 64))
    model, _ = build_tiny_model()
    with pytest.raises(EngineError, match="sync .* not verified"):
        VLLMServerEngine(server.url, model="tiny").load_weights(model)


def test_checksum_sees_names_dtypes_shapes_and_values():
    a = torch.arange(6, dtype=torch.float32)
    base = weights_checksum([("w", a), ("b", a[:2])])
    assert weights_checksum([("b", a[:2].clone()), ("w", a.clone())]) == base  # order-independent
    assert weights_checksum([("w2", a), ("b", a[:2])]) != base
    assert weights_checksum([("w", a.double()), ("b", a[:2])]) != base
    assert weights_checksum([("w", a.reshape(2, 3)), ("b", a[:2])]) != base
    changed = a.clone()
    changed[5] = torch.nextafter(changed[5], torch.tensor(100.0))
    assert weights_checksum([("w", changed), ("b", a[:2])]) != base
    assert weights_checksum([("w", a.bfloat16())]) == weights_checksum([("w", a.bfloat16().clone())])


def test_lora_weights_are_merged_under_the_base_models_names():
    from grpokit.models.loading import add_lora

    model, _ = build_tiny_model()
    policy = add_lora(model, 4, 8, 0.0, "all-linear")
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)  # a non-zero delta
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    sent = dict(policy_weights(policy))
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())  # the policy is untouched
    import copy

    merged = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert set(sent) == set(merged)
    for name, tensor in merged.items():
        torch.testing.assert_close(sent[name], tensor, rtol=1e-6, atol=1e-6)
    assert not torch.equal(sent["model.layers.0.self_attn.q_proj.weight"],
                           before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])


def test_unreachable_server_is_a_clear_error_within_the_connect_deadline():
    port = free_port()
    start = time.monotonic()
    with pytest.raises(EngineError) as info:
        VLLMServerEngine(f"http://127.0.0.1:{port}", model="tiny", connect_timeout_s=2)
    assert time.monotonic() - start < 30
    text = str(info.value)
    assert f"http://127.0.0.1:{port}/health" in text and "within 2 s" in text
    assert f"grpokit vllm-serve --model tiny --host 127.0.0.1 --port {port}" in text
    assert isinstance(info.value, GrpokitError)


def test_a_slow_answer_is_an_error_naming_the_deadline(serve):
    server = serve(FakeBackend(delay_s=3.0))
    engine = VLLMServerEngine(server.url, model="tiny", timeout_s=0.5)
    with pytest.raises(EngineError, match=r"/generate did not answer within the 0.5 s deadline"):
        engine.generate([[1]], 1, SamplingParams(max_tokens=2))


def test_a_backend_failure_reaches_the_client_with_the_servers_text(serve):
    server = serve(FakeBackend(fail="CUDA out of memory on the server"))
    engine = VLLMServerEngine(server.url, model="tiny")
    with pytest.raises(EngineError, match=r"HTTP 500: POST /generate: RuntimeError: CUDA out of memory on the server"):
        engine.generate([[1]], 2, SamplingParams(max_tokens=2))


def test_wrong_model_at_health_names_both(serve):
    server = serve(FakeBackend(model="Qwen/Qwen2.5-0.5B"))
    with pytest.raises(EngineError, match=r"serves model 'Qwen/Qwen2.5-0.5B', but this run trains 'tiny'"):
        VLLMServerEngine(server.url, model="tiny")


def test_health_reports_model_and_version(serve):
    import grpokit

    server = serve(FakeBackend(model="m"))
    assert requests.get(server.url + "/health", timeout=5).json() == {"status": "ok", "model": "m",
                                                                      "grpokit": grpokit.__version__}


@pytest.mark.parametrize(("body", "message"), [
    (b"{not json", "not valid JSON"),
    (b'{"n": 1, "params": {"max_tokens": 2}}', "missing field 'prompt_ids'"),
    (b'{"prompt_ids": [[1]], "n": 1, "params": {"max_tokens": 2, "top_q": 1}}', "unknown field(s) ['top_q']"),
    (b'{"prompt_ids": [[1]], "n": 1, "params": {}}', "missing field 'max_tokens'"),
    (b'{"prompt_ids": [[]], "n": 1, "params": {"max_tokens": 2}}', "non-empty lists"),
    (b'{"prompt_ids": [[1]], "n": 0, "params": {"max_tokens": 2}}', "n: expected an int >= 1"),
])
def test_bad_requests_get_400_with_a_clear_text(serve, body, message):
    backend = FakeBackend()
    server = serve(backend)
    answer = requests.post(server.url + "/generate", data=body, headers={"Content-Type": "application/json"}, timeout=5)
    assert answer.status_code == 400
    assert message in answer.json()["error"]
    assert backend.calls == []


def test_load_weights_request_needs_path_and_checksum(serve, tmp_path):
    server = serve(FakeBackend())
    answer = requests.post(server.url + "/load_weights", json={"path": str(tmp_path)}, timeout=5)
    assert answer.status_code == 400 and "missing field 'checksum'" in answer.json()["error"]


def test_vllm_serve_parser_defaults_to_loopback():
    parser = vllm_server.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--model", "m"])
    assert (args.host, args.port, args.tensor_parallel_size, args.gpu_memory_utilization) == ("127.0.0.1", 8000, 1, 0.9)
    assert (args.max_model_len, args.dtype, args.seed) == (None, "auto", None)
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --model is required


# ------------------------------------------------------------------------------------ fake `vllm` module

class FakeVLLMParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeLLM:
    """Stands in for vllm.LLM: generates like FakeBackend, runs worker-extension methods on a tiny model."""

    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.events = []
        self.model, _ = build_tiny_model(seed=1)
        self.model.load_weights = self._load_weights
        self.drop = set()  # names load_weights pretends to load but skips
        FakeLLM.instances.append(self)

    def _load_weights(self, weights):
        params = dict(self.model.named_parameters())
        for name, tensor in weights:
            if name in params and name not in self.drop:
                params[name].data.copy_(tensor)

    def generate(self, prompts, sampling_params, use_tqdm):
        self.events.append("generate")
        self.prompts, self.sampling_params = prompts, sampling_params
        outputs = []
        for prompt, sp in zip(prompts, sampling_params, strict=True):
            n = sp.kwargs["n"]
            completions = [SimpleNamespace(index=j, token_ids=[prompt["prompt_token_ids"][0], j],
                                           logprobs=[{prompt["prompt_token_ids"][0]: SimpleNamespace(logprob=-0.5)},
                                                     {j: SimpleNamespace(logprob=-1.5)}],
                                           finish_reason="stop" if j else "length")
                           for j in reversed(range(n))]  # out of order: the engine sorts by index
            outputs.append(SimpleNamespace(outputs=completions))
        return outputs

    def collective_rpc(self, method, args=()):
        self.events.append(method)
        worker = type("Worker", (WeightSyncExtension,), {})()
        worker.model_runner = SimpleNamespace(model=self.model)
        return [getattr(worker, method)(*args)]

    def reset_prefix_cache(self):
        self.events.append("reset_prefix_cache")

    def sleep(self, level):
        self.events.append(f"sleep{level}")

    def wake_up(self):
        self.events.append("wake_up")


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.SamplingParams = FakeVLLMParams
    module.LLM = FakeLLM
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    FakeLLM.instances.clear()
    return module


def test_sampling_params_conversion(fake_vllm):
    params = SamplingParams(max_tokens=9, temperature=0.0, top_p=0.8, top_k=0, min_p=0.1, repetition_penalty=1.2,
                            stop_token_ids=[3], stop=["END"], seed=5)
    converted = vllm_engine.vllm_sampling_params(params, 4, seed=77).kwargs
    assert converted == {"n": 4, "max_tokens": 9, "temperature": 0.0, "top_p": 0.8, "top_k": -1, "min_p": 0.1,
                         "repetition_penalty": 1.2, "seed": 77, "stop": ["END"], "stop_token_ids": [3],
                         "ignore_eos": True, "logprobs": 0, "detokenize": True}
    plain = vllm_engine.vllm_sampling_params(SamplingParams(max_tokens=2, top_k=50), 1, seed=None).kwargs
    assert (plain["top_k"], plain["stop"], plain["stop_token_ids"], plain["detokenize"]) == (50, None, None, False)


def test_prompt_seeds_are_per_prompt_and_reproducible():
    seeds = vllm_engine.prompt_seeds([[1, 2], [3], [1, 2]], 42)
    assert len(set(seeds)) == 3  # a repeated prompt gets its own stream
    assert seeds == vllm_engine.prompt_seeds([[1, 2], [3], [1, 2]], 42)
    assert seeds[1] == vllm_engine.prompt_seeds([[3]], 42)[0]  # independent of the other prompts
    assert seeds != vllm_engine.prompt_seeds([[1, 2], [3], [1, 2]], 43)
    assert all(0 <= s < 2**62 for s in seeds)


def test_colocate_generate_sleeps_and_wakes_and_converts_outputs(fake_vllm):
    engine = VLLMColocateEngine("/models/tiny", gpu_memory_utilization=0.3, max_model_len=64, dtype="bfloat16",
                                seed=3, sleep_mode=True)
    llm = FakeLLM.instances[-1]
    assert llm.kwargs["logprobs_mode"] == "processed_logprobs" and llm.kwargs["enable_sleep_mode"] is True
    assert llm.kwargs["worker_extension_cls"] == "grpokit.rollout.vllm_engine.WeightSyncExtension"
    rollout = engine.generate([[5, 6], [8]], 2, SamplingParams(max_tokens=4, seed=1))
    assert rollout.completion_ids == [[5, 0], [5, 1], [8, 0], [8, 1]]
    assert rollout.sampler_logps == [[-0.5, -1.5]] * 4
    assert rollout.finish_reasons == ["length", "stop"] * 2
    assert llm.prompts == [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [8]}]
    assert [sp.kwargs["seed"] for sp in llm.sampling_params] == vllm_engine.prompt_seeds([[5, 6], [8]], 1)
    engine.generate([[5]], 1, SamplingParams(max_tokens=1))
    assert llm.events == ["generate", "sleep1", "wake_up", "generate", "sleep1"]


def test_colocate_load_weights_pushes_and_verifies(fake_vllm):
    engine = VLLMColocateEngine("/models/tiny")
    llm = FakeLLM.instances[-1]
    policy, _ = build_tiny_model(seed=0)
    engine.load_weights(policy)
    for name, tensor in policy.state_dict().items():
        assert torch.equal(llm.model.state_dict()[name], tensor), name
    assert llm.events == ["grpokit_load_tensors", "reset_prefix_cache"]


def test_colocate_sync_that_vllm_did_not_apply_is_not_verified(fake_vllm):
    engine = VLLMColocateEngine("/models/tiny")
    FakeLLM.instances[-1].drop = {"model.embed_tokens.weight"}
    policy, _ = build_tiny_model(seed=0)
    with pytest.raises(EngineError, match="not verified: after loading, vLLM's 'model.embed_tokens.weight' differs"):
        engine.load_weights(policy)


def test_sync_with_names_vllm_does_not_know_is_not_verified(fake_vllm):
    engine = VLLMColocateEngine("/models/tiny")
    policy, _ = build_tiny_model(seed=0)
    wrapped = torch.nn.ModuleDict({"wrapper": policy})  # every name gets a "wrapper." prefix
    with pytest.raises(EngineError, match="none of the .* tensors sent .* has the name and shape of a vLLM parameter"):
        engine.load_weights(wrapped)


def test_server_backend_load_from_dir_uses_the_worker_extension(fake_vllm, tmp_path):
    backend = vllm_server.VLLMBackend("tiny")
    policy, _ = build_tiny_model(seed=0)
    checksum = vllm_engine.write_safetensors(policy_weights(policy), tmp_path)
    assert backend.load_weights(str(tmp_path)) == checksum == weights_checksum(policy.state_dict().items())
    assert FakeLLM.instances[-1].events == ["grpokit_load_from_dir", "reset_prefix_cache"]


def test_finish_reasons_other_than_stop_or_length_are_errors():
    assert vllm_engine.normalise_finish_reason("stop") == "stop"
    assert vllm_engine.normalise_finish_reason("length") == "length"
    with pytest.raises(EngineError, match="'abort'"):
        vllm_engine.normalise_finish_reason("abort")


def test_make_engine_without_use_vllm_imports_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # an import would raise
    assert make_engine(SimpleNamespace(use_vllm=False), "/models/tiny") is None


def test_make_engine_colocate_names_the_missing_pieces(monkeypatch):
    cfg = SimpleNamespace(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.5,
                          vllm_tensor_parallel_size=1, vllm_max_model_len=None, seed=0, model="m",
                          torch_dtype="float32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EngineError, match=r"torch.cuda.is_available\(\) is False"):
        make_engine(cfg, "/models/tiny")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(EngineError, match=r"pip install 'grpokit\[vllm\]'"):
        make_engine(cfg, "/models/tiny")


def test_make_engine_server_mode_checks_the_server(serve):
    server = serve(FakeBackend(model="m"))
    host, port = server.server_address[:2]
    cfg = SimpleNamespace(use_vllm=True, vllm_mode="server", vllm_host=host, vllm_port=port, model="m")
    policy, _ = build_tiny_model()
    engine = make_engine(cfg, "/unused", policy)
    assert isinstance(engine, VLLMServerEngine)
    assert server.backend.loaded is not None  # the initial sync happened


# ----------------------------------------------------------------------------------------------- real vLLM

def _real_vllm_skip_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not importable (pip install 'grpokit[vllm]')"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False: vLLM needs a CUDA GPU"
    return None


@pytest.mark.skipif(_real_vllm_skip_reason() is not None, reason=_real_vllm_skip_reason() or "")
def test_real_vllm_colocate_generate_and_load_weights(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = VLLMColocateEngine(str(tmp_path), gpu_memory_utilization=0.2, max_model_len=128, dtype="float32", seed=0)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7)
    prompts = [tokenizer("abc")["input_ids"], tokenizer("xy")["input_ids"]]
    first = engine.generate(prompts, 3, params)
    assert len(first.completion_ids) == 6 and all(len(r) == len(lp) for r, lp in
                                                   zip(first.completion_ids, first.sampler_logps, strict=True))
    assert all(x <= 0 for row in first.sampler_logps for x in row)
    torch.manual_seed(1)
    other = LlamaForCausalLM(config)
    engine.load_weights(other)  # raises unless the read-back matches
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    after = engine.generate(prompts, 1, greedy)
    from grpokit.rollout.torch_engine import TorchEngine

    expected = TorchEngine(other.eval(), pad_token_id=0).generate(prompts, 1, greedy)
    assert after.completion_ids == expected.completion_ids  # vLLM generates with the synced weights
    engine.close()


def test_make_engine_passes_vllm_dtype_and_prefix_caching_in_colocate_mode(fake_vllm, monkeypatch):
    """Reference 001's `vllm_dtype` and `vllm_enable_prefix_caching` reach vllm.LLM; unset, vLLM keeps its default."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    base = dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.5, vllm_tensor_parallel_size=1,
                vllm_max_model_len=None, seed=0, model="m", torch_dtype="float32")
    make_engine(SimpleNamespace(**base, vllm_dtype="bfloat16", vllm_enable_prefix_caching=False), "/models/tiny")
    llm = FakeLLM.instances[-1]
    assert llm.kwargs["dtype"] == "bfloat16" and llm.kwargs["enable_prefix_caching"] is False
    make_engine(SimpleNamespace(**base, vllm_dtype=None, vllm_enable_prefix_caching=None), "/models/tiny")
    llm = FakeLLM.instances[-1]
    assert llm.kwargs["dtype"] == "float32" and "enable_prefix_caching" not in llm.kwargs


def test_make_engine_server_mode_names_the_server_flag_for_dtype(serve, caplog):
    server = serve(FakeBackend(model="m"))
    host, port = server.server_address[:2]
    cfg = SimpleNamespace(use_vllm=True, vllm_mode="server", vllm_host=host, vllm_port=port, model="m",
                          vllm_dtype="bfloat16", vllm_enable_prefix_caching=True)
    with caplog.at_level("WARNING", logger="grpokit"):
        assert isinstance(make_engine(cfg, "/unused"), VLLMServerEngine)
    assert "grpokit vllm-serve ... --dtype bfloat16" in caplog.text
    assert "grpokit vllm-serve ... --enable-prefix-caching" in caplog.text


def test_make_engine_server_mode_names_the_server_flags_of_the_sizes_the_run_set(serve, caplog):
    """Axolotl's `vllm:` block (gpu_memory_utilization, max_model_len, tensor_parallel_size) in server mode: the
    server's settings, which the run cannot change; each one the config sets is a warning with its flag, the
    schema's defaults are not."""
    from grpokit.config import validate_config

    server = serve(FakeBackend(model="m"))
    host, port = server.server_address[:2]
    common = {"use_vllm": True, "vllm_mode": "server", "vllm_host": host, "vllm_port": port, "model": "m"}
    with caplog.at_level("WARNING", logger="grpokit"):
        make_engine(validate_config(common), "/unused")
    assert "server's setting" not in caplog.text
    cfg = validate_config({**common, "vllm_gpu_memory_utilization": 0.7, "vllm_max_model_len": 2048,
                           "vllm_tensor_parallel_size": 2})
    with caplog.at_level("WARNING", logger="grpokit"):
        assert isinstance(make_engine(cfg, "/unused"), VLLMServerEngine)
    for flag in ("--gpu-memory-utilization 0.7", "--max-model-len 2048", "--tensor-parallel-size 2"):
        assert f"`grpokit vllm-serve ... {flag}` (this run cannot change it)" in caplog.text


def test_the_early_checks_find_a_missing_or_wrong_server_before_any_model_loads(serve, tmp_path, monkeypatch):
    """use_vllm in server mode (Axolotl's `vllm:` block with `trl.use_vllm: true`): the checks every run makes first
    (the dry run's, check's, and the trainer's before its model load) ask the server: none answering, or one serving
    another model, stops there with what to start; the right one passes."""
    import json

    from grpokit.config import validate_config
    from grpokit.evaluation.preflight import early_checks

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "1"}) + "\n"
                                                  for i in range(4)))
    common = {"use_vllm": True, "vllm_mode": "server", "vllm_host": "127.0.0.1", "model": "gpt2",
              "dataset": "train.jsonl", "num_generations": 2, "per_device_train_batch_size": 2}
    with pytest.raises(EngineError, match="no vLLM server answered at http://127.0.0.1:.*/health"):
        early_checks(validate_config({**common, "vllm_port": free_port()}))
    other = serve(FakeBackend(model="Qwen/Qwen2.5-0.5B"))
    with pytest.raises(EngineError, match="serves model 'Qwen/Qwen2.5-0.5B', but this run trains 'gpt2'"):
        early_checks(validate_config({**common, "vllm_port": other.server_address[1]}))
    right = serve(FakeBackend(model="gpt2"))
    assert early_checks(validate_config({**common, "vllm_port": right.server_address[1]})).train_records
