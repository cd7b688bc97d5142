"""LLMJudge against a small OpenAI-compatible server started on 127.0.0.1 by the test."""

from __future__ import annotations

import http.server
import importlib
import json
import logging
import threading
import time

import pytest

from grpokit.errors import ConfigError, RewardError
from grpokit.rewards.judge import LLMJudge, parse_score
from grpokit.rewards.registry import BUILTIN_REWARDS

KEY = "sk-test-5ecret-do-not-leak"


def reply(text: str):
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            n = len(self.server.requests)
        status, payload, *delay = self.server.respond(body, n)
        if delay:
            self.server.release.wait(delay[0])  # a hung server; released at teardown
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.lock, srv.requests, srv.release = threading.Lock(), [], threading.Event()
    srv.respond = lambda body, n: reply("Score: 5")
    srv.base_url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def judge_for(server, monkeypatch):
    monkeypatch.setenv("GRPOKIT_TEST_JUDGE_KEY", KEY)

    def make(**kwargs):
        args = {"model": "judge-model", "base_url": server.base_url, "api_key_env": "GRPOKIT_TEST_JUDGE_KEY",
                "backoff_s": 0.01, **kwargs}
        return LLMJudge(**args)

    return make


def _user_message(body: dict) -> str:
    return body["messages"][-1]["content"]


def test_scores_normalised_and_request_body(server, judge_for):
    server.respond = lambda body, n: reply("Correct.\nScore: 9" if "forty-two" in _user_message(body)
                                           else "Wrong answer, 2/10")
    judge = judge_for(temperature=0.0, max_tokens=64)
    scores = judge(prompts=["What is 6*7?", "What is 6*7?"], completions=["It is forty-two", "It is 41"],
                   answer=["42", "42"])
    assert scores == pytest.approx([0.9, 0.2])
    assert len(server.requests) == 2
    for request in server.requests:
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Authorization"] == f"Bearer {KEY}"
        body = request["body"]
        assert body["model"] == "judge-model" and body["temperature"] == 0.0 and body["max_tokens"] == 64
        message = _user_message(body)
        assert "What is 6*7?" in message and "42" in message and ("forty-two" in message or "It is 41" in message)


def test_conversational_data_and_no_reference(server, judge_for):
    judge = judge_for(score_range=[1, 5], prompt_template="Q: {prompt}\nA: {completion}\nRef: {reference}\nScore 1-5.",
                      max_tokens=None, extra_body={"max_completion_tokens": 32})
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}]
    scores = judge(prompts=[prompt], completions=[[{"role": "assistant", "content": "7"}]])
    assert scores == [pytest.approx((5 - 1) / 4)]
    body = server.requests[0]["body"]
    assert "max_tokens" not in body and body["max_completion_tokens"] == 32
    message = _user_message(body)
    assert message.startswith("Q: system: Be brief.\n\nuser: Name a prime.\nA: 7\nRef: (none given)")


@pytest.mark.parametrize("status", [500, 429, 503, 408])
def test_transient_errors_are_retried(server, judge_for, status):
    server.respond = lambda body, n: (status, {"error": "busy"}) if n <= 2 else reply("Score: 8")
    assert judge_for(max_retries=3)(prompts=["p"], completions=["c"]) == [pytest.approx(0.8)]
    assert len(server.requests) == 3


def test_retries_exhausted_give_none_and_a_warning(server, judge_for, caplog):
    server.respond = lambda body, n: (500, f"internal error, key was {KEY}")
    with caplog.at_level(logging.WARNING, logger="grpokit.rewards.judge"):
        assert judge_for(max_retries=2)(prompts=["p"], completions=["c"]) == [None]
    assert len(server.requests) == 3
    assert "status 500" in caplog.text and "internal error" in caplog.text
    assert KEY not in caplog.text


def test_hung_server_times_out_fast(server, judge_for):
    server.respond = lambda body, n: (*reply("Score: 9"), 60)
    judge = judge_for(timeout_s=0.3, max_retries=1)
    start = time.monotonic()
    assert judge(prompts=["p"], completions=["c"]) == [None]
    assert time.monotonic() - start < 3
    assert len(server.requests) == 2  # the timeout was retried once


def test_batch_deadline_keeps_what_finished(server, judge_for, caplog):
    server.respond = lambda body, n: (*reply("Score: 9"), 60) if "slow" in _user_message(body) else reply("Score: 3")
    judge = judge_for(timeout_s=30, deadline_s=0.5, concurrency=2)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="grpokit.rewards.judge"):
        scores = judge(prompts=["p", "p"], completions=["fast one", "slow one"])
    assert time.monotonic() - start < 3
    assert scores == [pytest.approx(0.3), None]
    assert "deadline_s=0.5" in caplog.text


@pytest.mark.parametrize("status", [401, 404])
def test_user_errors_raise_with_server_text_and_no_key(server, judge_for, status):
    text = {401: f"Incorrect API key provided: {KEY}", 404: "The model `judge-model` does not exist"}[status]
    # only the first request fails, so the error must come from that one answer, not from a failed batch
    server.respond = lambda body, n: (status, {"error": {"message": text}}) if n == 1 else reply("Score: 5")
    with pytest.raises(RewardError) as info:
        judge_for(max_retries=3, concurrency=1)(prompts=["p"] * 3, completions=["alpha", "beta", "gamma"])
    message = str(info.value)
    assert f"answered {status}" in message and server.base_url in message and text.split(":")[0] in message
    assert {401: "API key", 404: "model name"}[status] in message
    assert KEY not in message and KEY not in repr(info.value)
    assert sum("alpha" in _user_message(r["body"]) for r in server.requests) == 1  # never retried


def test_unparseable_reply_is_none_with_warning(server, judge_for, caplog):
    server.respond = lambda body, n: reply("I cannot judge this one.") if n == 1 else reply("Score: 10")
    with caplog.at_level(logging.WARNING, logger="grpokit.rewards.judge"):
        scores = judge_for(concurrency=1)(prompts=["p", "p"], completions=["a", "b"])
    assert scores == [None, 1.0]
    assert "I cannot judge this one." in caplog.text and "status 200" in caplog.text and KEY not in caplog.text


def test_bad_request_is_none_for_one_and_an_error_for_all(server, judge_for):
    server.respond = lambda body, n: (400, "context length exceeded") if "long" in _user_message(body) else reply("7")
    judge = judge_for()
    assert judge(prompts=["p", "p"], completions=["long", "short"]) == [None, pytest.approx(0.7)]
    with pytest.raises(RewardError, match="rejected every request.*context length exceeded"):
        judge(prompts=["p"], completions=["long"])


def test_key_not_kept_on_the_object(judge_for):
    judge = judge_for()
    assert KEY not in repr(judge) and KEY not in str(vars(judge)) and "GRPOKIT_TEST_JUDGE_KEY" in repr(judge)


def test_missing_key(server, monkeypatch):
    monkeypatch.delenv("GRPOKIT_TEST_NO_SUCH_KEY", raising=False)
    local = LLMJudge(model="m", base_url=server.base_url, api_key_env="GRPOKIT_TEST_NO_SUCH_KEY")
    assert local(prompts=["p"], completions=["c"]) == [0.5]
    assert "Authorization" not in server.requests[-1]["headers"]
    with pytest.raises(RewardError, match="GRPOKIT_TEST_NO_SUCH_KEY is not set"):
        LLMJudge(model="m", base_url="https://judge.example.com/v1", api_key_env="GRPOKIT_TEST_NO_SUCH_KEY")
    LLMJudge(model="m", base_url="https://judge.example.com/v1", api_key_env=None)  # no key wanted: fine


@pytest.mark.parametrize(("args", "match"), [
    ({"prompt_template": "Rate {answer}: {completion}"}, "prompt_template"),
    ({"prompt_template": "Rate {prompt}"}, "prompt_template"),
    ({"score_range": [10, 0]}, "score_range"),
    ({"base_url": "127.0.0.1:8000"}, "base_url"),
    ({"concurrency": 0}, "concurrency"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ConfigError, match=match):
        LLMJudge(model="m", api_key_env=None, **args)


@pytest.mark.parametrize(("text", "expected"), [
    ("Score: 7", 7.0),
    ("7", 7.0),
    ("7.5", 7.5),
    ("I'd give it 8/10.", 8.0),
    ("8 out of 10", 8.0),
    ("**Score:** 6/10", 6.0),
    ("The response makes 3 errors in 12 steps.\nScore: 4", 4.0),
    ("In 2024 terms, I give it 6", 6.0),
    ("<think>maybe a 3?</think>\nFinal score: 9", 9.0),
    ("Step 1 is fine. Score: 11", None),  # an explicit score out of range is no score
    ("no idea", None),
    ("", None),
])
def test_parse_score(text, expected):
    assert parse_score(text, 0, 10) == expected


def test_registered_name():
    module, _, attr = BUILTIN_REWARDS["llm_judge"].partition(":")
    assert getattr(importlib.import_module(module), attr) is LLMJudge
    assert LLMJudge.isolation == "inline" and LLMJudge.expensive is True


def test_a_server_that_refuses_every_connection_is_an_error_not_missing(monkeypatch):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("GRPOKIT_TEST_JUDGE_KEY", KEY)
    judge = LLMJudge(model="m", base_url=f"http://127.0.0.1:{port}/v1", api_key_env="GRPOKIT_TEST_JUDGE_KEY",
                     backoff_s=0.01, max_retries=1)
    with pytest.raises(RewardError, match=f"could not connect to http://127.0.0.1:{port}/v1/chat/completions for "
                                          "any of 2 completions; is the server running") as err:
        judge(prompts=["p", "p"], completions=["a", "b"])
    assert KEY not in str(err.value)
