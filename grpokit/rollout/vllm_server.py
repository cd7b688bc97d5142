"""`grpokit vllm-serve`: a vLLM model behind a small HTTP JSON API for server-mode training.

Endpoints (JSON in and out; an error is a non-200 answer {"error": "<text>"}, 400 for a bad request):
- GET /health -> {"status": "ok", "model": <--model as given>, "grpokit": <version>}
- POST /generate {"prompt_ids": [[int]], "n": int, "params": {grpokit SamplingParams fields}}
    -> {"completion_ids": [[int]], "logprobs": [[float]], "finish_reasons": ["stop" | "length"]},
    prompt-major (row i belongs to prompt i // n); logprobs: each sampled token's log-prob
    (vLLM's processed log-probs: see grpokit.rollout.vllm_engine).
- POST /load_weights {"path": <directory of *.safetensors>, "checksum": <the sender's>}
    -> {"checksum": <weights_checksum of the tensors the server read>, "verified": <tensors read back>}.
    The client compares the checksums; the server itself refuses a sync whose read-back differs.

The server is the standard library's ThreadingHTTPServer (no new dependency; tests run it on port 0
with a fake backend). Requests to the backend are serialised by a lock (vllm.LLM is not thread-safe);
/health answers while a generation runs. It binds to 127.0.0.1 unless --host says otherwise: anyone
who can reach the port can make it load weights from any directory the server can read.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from dataclasses import fields
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

import grpokit
from grpokit.rollout.base import Rollout, SamplingParams

log = logging.getLogger(__name__)

_MAX_BODY = 1 << 30  # bytes: a /generate request larger than this is refused


class Backend(Protocol):
    model: str  # the model name or path, as given on the command line

    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> Rollout: ...

    def load_weights(self, path: str) -> str: ...


class VLLMBackend:
    """vllm.LLM behind the Backend protocol."""

    def __init__(self, model: str, *, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, dtype: str = "auto", seed: int | None = None,
                 enable_prefix_caching: bool | None = None):
        from grpokit.rollout.vllm_engine import new_llm

        self.model = model
        self.llm = new_llm(model, tensor_parallel_size=tensor_parallel_size,
                           gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, dtype=dtype,
                           seed=seed, enable_prefix_caching=enable_prefix_caching)

    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> Rollout:
        from grpokit.rollout.vllm_engine import vllm_generate

        return vllm_generate(self.llm, prompt_ids, n, params)

    def load_weights(self, path: str) -> str:
        from grpokit.rollout.vllm_engine import EngineError

        results = self.llm.collective_rpc("grpokit_load_from_dir", args=(path,))  # one (checksum, verified) per worker
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        checksums = {checksum for checksum, _ in results}
        if len(checksums) != 1:
            raise EngineError(f"weight sync: the {len(results)} vLLM workers read different files from {path}")
        return checksums.pop()


class BadRequest(ValueError):
    """The request's JSON is malformed or lacks a field: answered with 400."""


def parse_generate(body: dict) -> tuple[list[list[int]], int, SamplingParams]:
    prompt_ids, n, params = _field(body, "prompt_ids", list), _field(body, "n", int), _field(body, "params", dict)
    if not prompt_ids or not all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in prompt_ids):
        raise BadRequest("prompt_ids: expected a non-empty list of non-empty lists of token ids (ints)")
    if n < 1:
        raise BadRequest(f"n: expected an int >= 1, got {n}")
    known = {f.name for f in fields(SamplingParams)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise BadRequest(f"params: unknown field(s) {unknown}; known: {sorted(known)}")
    if "max_tokens" not in params:
        raise BadRequest("params: missing field 'max_tokens'")
    return prompt_ids, n, SamplingParams(**params)


def _field(body: dict, name: str, kind: type):
    if name not in body:
        raise BadRequest(f"missing field '{name}'")
    value = body[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadRequest(f"{name}: expected {kind.__name__}, got {type(value).__name__}")
    return value


class GrpokitHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], backend: Backend):
        super().__init__(address, _Handler)
        self.backend = backend
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def shutdown(self) -> None:
        super().shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: GrpokitHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.address_string(), format % args)

    def _answer(self, status: int, body: dict) -> None:
        if status != HTTPStatus.OK:
            self.close_connection = True  # the request body may be unread: do not reuse the connection
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path != "/health":
            self._answer(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: GET {self.path} (try GET /health)"})
            return
        self._answer(HTTPStatus.OK,
                     {"status": "ok", "model": self.server.backend.model, "grpokit": grpokit.__version__})

    def do_POST(self) -> None:  # noqa: N802
        routes = {"/generate": self._generate, "/load_weights": self._load_weights}
        if self.path not in routes:
            self._answer(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: POST {self.path} "
                                                         "(POST /generate or /load_weights)"})
            return
        try:
            body = self._read_json()
            with self.server.lock:
                answer = routes[self.path](body)
        except BadRequest as exc:
            self._answer(HTTPStatus.BAD_REQUEST, {"error": f"POST {self.path}: {exc}"})
            return
        # the backend's failure goes back to the trainer as text: the client raises it with this message
        except Exception as exc:  # noqa: BLE001
            log.exception("POST %s failed", self.path)
            self._answer(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"POST {self.path}: {type(exc).__name__}: {exc}"})
            return
        self._answer(HTTPStatus.OK, answer)

    def _read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest("a JSON body with a Content-Length header is required")
        if int(length) > _MAX_BODY:
            raise BadRequest(f"body of {length} bytes is larger than the limit of {_MAX_BODY}")
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"body is not valid JSON ({exc})") from exc
        if not isinstance(body, dict):
            raise BadRequest(f"body must be a JSON object, got {type(body).__name__}")
        return body

    def _generate(self, body: dict) -> dict:
        prompt_ids, n, params = parse_generate(body)
        rollout = self.server.backend.generate(prompt_ids, n, params)
        return {"completion_ids": rollout.completion_ids, "logprobs": rollout.sampler_logps,
                "finish_reasons": list(rollout.finish_reasons)}

    def _load_weights(self, body: dict) -> dict:
        path, sent = _field(body, "path", str), _field(body, "checksum", str)
        loaded = self.server.backend.load_weights(path)
        if loaded != sent:
            log.warning("weight sync from %s: sender's checksum %s, loaded %s", path, sent, loaded)
        return {"checksum": loaded}


def serve(backend: Backend, host: str = "127.0.0.1", port: int = 8000) -> GrpokitHTTPServer:
    """Start serving `backend` in a background thread; returns the server (`.url`, `.shutdown()`). Port 0: any
    free port."""
    server = GrpokitHTTPServer((host, port), backend)
    server.thread = threading.Thread(target=server.serve_forever, name="grpokit-vllm-serve", daemon=True)
    server.thread.start()
    return server


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="Hub id or local directory; the trainer's `model` must be "
                                                       "the same string")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                                                            "0.0.0.0 exposes weight loading to the network)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the model is split across")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="fraction of GPU memory vLLM may take")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (prompt + completion); "
                                                                        "default: the model's")
    parser.add_argument("--dtype", default="auto", help="weights' dtype in vLLM: auto, bfloat16, float16, float32")
    parser.add_argument("--seed", type=int, default=None, help="vLLM's engine seed (requests carry their own)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                        help="vLLM's prefix caching of prompt KV blocks (default: vLLM's, on)")
    return parser


def main(args: argparse.Namespace) -> int:
    backend = VLLMBackend(args.model, tensor_parallel_size=args.tensor_parallel_size,
                          gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                          dtype=args.dtype, seed=args.seed, enable_prefix_caching=args.enable_prefix_caching)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach port %d can generate and replace the model's weights",
                    args.host, args.port)
    server = serve(backend, args.host, args.port)
    print(f"grpokit vllm-serve: {args.model} at {server.url} (Ctrl-C stops)", flush=True)
    try:
        while server.thread is not None and server.thread.is_alive():
            server.thread.join(timeout=1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0
